"""``TorchTransport``: point-to-point through ``torch.distributed`` isend/irecv on the group's own
backend, gloo for CPU tensors and NCCL for CUDA tensors (``batch_isend_irecv`` for exchanges over
NCCL). Every wait is ``Work.wait(timeout)``, which blocks the host, bounded, on either backend."""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .cuda_streams import indexed
from .errors import as_timedelta, first_line
from .transport import Transport


class _Pending:
    __slots__ = ("work", "tensor", "peer", "what", "start", "is_send", "timeout")

    def __init__(self, work, tensor, peer, what, is_send, timeout):
        self.work, self.tensor, self.peer, self.what, self.is_send = work, tensor, peer, what, is_send
        self.timeout = timeout
        self.start = time.monotonic()


class TorchTransport(Transport):
    """``torch.distributed`` point-to-point on ``group``'s backend for ``device``: gloo (CPU) or
    NCCL (CUDA). On NCCL the tags are ignored and a send and a receive that belong together must
    go in one ``batch_isend_irecv``, which ``exchange`` does; ``Work.wait(timeout)`` then blocks
    the host, bounded, on either backend."""

    def __init__(self, group: Optional[dist.ProcessGroup], device: torch.device = torch.device("cpu")):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device = indexed(device)
        backend = str(dist.get_backend(group)).lower()
        self.over_nccl = device.type == "cuda" and "nccl" in backend
        self._sends: list[_Pending] = []

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _post(self, op, tensor, peer, tag, what, is_send, timeout) -> _Pending:
        try:
            work = op(tensor, self._global(peer), group=self.group, tag=tag)
        except RuntimeError as exc:
            raise self.fail(peer, what, first_line(exc), is_send, 0.0, timeout) from exc
        pending = _Pending(work, tensor, peer, what, is_send, timeout)
        if is_send:
            self._sends.append(pending)  # keeps the buffer alive until the send is retired
        return pending

    def send(self, tensor: Tensor, peer: int, tag: int, what: str, timeout: float) -> _Pending:
        return self._post(dist.isend, tensor, peer, tag, what, True, timeout)

    def recv(self, tensor: Tensor, peer: int, tag: int, what: str, timeout: float) -> _Pending:
        return self._post(dist.irecv, tensor, peer, tag, what, False, timeout)

    def wait(self, pending: _Pending) -> Tensor:
        left = max(pending.timeout - (time.monotonic() - pending.start), 0.001)
        try:
            pending.work.wait(as_timedelta(left))
        except RuntimeError as exc:
            raise self.fail(pending.peer, pending.what, first_line(exc), pending.is_send,
                            time.monotonic() - pending.start, pending.timeout) from exc
        if pending.is_send and pending in self._sends:
            self._sends.remove(pending)
        return pending.tensor

    def exchange(self, sends: list, recvs: list, tag: int, timeout: float, complete: bool = False) -> None:
        """Post sends and receives, (tensor, peer, what) each, and wait for the receives (and,
        with ``complete``, the sends: then both sides hold what the other sent before either
        goes on, so a rank that raises next cannot tear the connection down under its peer)."""
        items = [(dist.isend, t, p, w, True) for t, p, w in sends] + \
                [(dist.irecv, t, p, w, False) for t, p, w in recvs]
        if not items:
            return
        if self.over_nccl:  # one NCCL group: issued apart, two ranks that both send first deadlock
            try:
                works = dist.batch_isend_irecv([dist.P2POp(op, t, self._global(p), self.group, tag)
                                                for op, t, p, _, _ in items])
            except RuntimeError as exc:
                raise self.fail(items[0][2], items[0][3], first_line(exc), items[0][4], 0.0,
                                timeout) from exc
            pending = [_Pending(wk, t, p, w, s, timeout) for wk, (_, t, p, w, s) in zip(works, items)]
            self._sends.extend(q for q in pending if q.is_send)
        else:
            pending = [self._post(op, t, p, tag, w, s, timeout) for op, t, p, w, s in items]
        for q in pending:
            if complete or not q.is_send:
                self.wait(q)

    def forward_done(self) -> None:
        """End of a forward. gloo: wait until the neighbour holds the state (it posted the receive
        after its speculative slice, so this rarely waits), so a rank that exits after a
        forward-only call cannot drop its send. NCCL: retire what completed; ``flush`` in the
        backward and at exit waits for the rest."""
        if self.over_nccl:
            self.retire()
        else:
            self.flush()

    def flush(self) -> None:
        """Wait for every send still in flight (each within its timeout)."""
        while self._sends:
            self.wait(self._sends[0])

    def retire(self) -> None:
        """Drop the sends that completed, without waiting."""
        self._sends = [p for p in self._sends if not p.work.is_completed()]

