"""Point-to-point transport between the ranks of a time group, with bounded waits.

Two engines, picked by the tensor's device (``transport_for``):
  * ``GlooTransport``: CPU tensors through ``torch.distributed`` isend/irecv on a gloo group; every
    wait is ``Work.wait(timeout)``.
  * ``NcclTransport``: CUDA tensors through ``cupy.cuda.nccl`` on PyTorch's current stream. The NCCL
    unique id goes through the ``torch.distributed`` store that ``torchrun`` set up, so it works
    across nodes. NCCL waits on the stream, not the host: a watchdog thread polls an event per
    operation and, past the timeout, aborts the communicator and records the error, which the
    next call on the host raises.

Only N-element states move (never a whole sequence). Every failure is a ``TimeShardingError``
naming this rank, the peer, the layer and what was being exchanged.
"""
from __future__ import annotations

import datetime
import os
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT = float(os.environ.get("SJ_TF_SHARD_TIMEOUT", "300"))


class TimeShardingError(RuntimeError):
    """A peer of the time group died, stalled, or disagreed about shapes or layers."""


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


class _Pending:
    __slots__ = ("work", "tensor", "peer", "what", "start", "is_send", "timeout")

    def __init__(self, work, tensor, peer, what, is_send, timeout):
        self.work, self.tensor, self.peer, self.what, self.is_send = work, tensor, peer, what, is_send
        self.timeout = timeout
        self.start = time.monotonic()


class Transport:
    """Ranks are ranks of the time group (0 .. size-1, in time order)."""

    rank: int
    size: int
    # False for NCCL: checking a header on the host costs a device sync (see node.py).
    validates_every_call = True

    def fail(self, peer: int, what: str, cause: str, is_send: bool, waited: float,
             timeout: float) -> TimeShardingError:
        direction = "sending to" if is_send else "waiting for"
        return TimeShardingError(
            f"time-sharded rank {self.rank} of {self.size}: {direction} rank {peer}: {what} failed "
            f"after {waited:.1f} s (timeout {timeout:g} s): {cause}. Rank {peer} died, stalled, "
            f"or ran other layers or shapes than this rank; see its log. The timeout is "
            f"TimeShardedNode(timeout=...) or SJ_TF_SHARD_TIMEOUT.")


class GlooTransport(Transport):
    def __init__(self, group: Optional[dist.ProcessGroup]):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._sends: list[_Pending] = []

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def send(self, tensor: Tensor, peer: int, tag: int, what: str, timeout: float) -> _Pending:
        try:
            work = dist.isend(tensor, self._global(peer), group=self.group, tag=tag)
        except RuntimeError as exc:
            raise self.fail(peer, what, str(exc).splitlines()[0], True, 0.0, timeout) from exc
        pending = _Pending(work, tensor, peer, what, True, timeout)
        self._sends.append(pending)  # keeps the buffer alive until the send is retired
        return pending

    def recv(self, tensor: Tensor, peer: int, tag: int, what: str, timeout: float) -> _Pending:
        try:
            work = dist.irecv(tensor, self._global(peer), group=self.group, tag=tag)
        except RuntimeError as exc:
            raise self.fail(peer, what, str(exc).splitlines()[0], False, 0.0, timeout) from exc
        return _Pending(work, tensor, peer, what, False, timeout)

    def wait(self, pending: _Pending) -> Tensor:
        left = max(pending.timeout - (time.monotonic() - pending.start), 0.001)
        try:
            pending.work.wait(_timedelta(left))
        except RuntimeError as exc:
            raise self.fail(pending.peer, pending.what, str(exc).splitlines()[0], pending.is_send,
                            time.monotonic() - pending.start, pending.timeout) from exc
        if pending.is_send and pending in self._sends:
            self._sends.remove(pending)
        return pending.tensor

    def exchange(self, sends: list, recvs: list, tag: int, timeout: float) -> None:
        """Post sends and receives, (tensor, peer, what) each, and wait for the receives."""
        for tensor, peer, what in sends:
            self.send(tensor, peer, tag, what, timeout)
        pending = [self.recv(tensor, peer, tag, what, timeout) for tensor, peer, what in recvs]
        for p in pending:
            self.wait(p)

    def flush(self) -> None:
        """Wait for every send still in flight (each within the timeout)."""
        while self._sends:
            self.wait(self._sends[0])

    def retire(self) -> None:
        """Drop the sends that completed, without waiting."""
        self._sends = [p for p in self._sends if not p.work.is_completed()]

    def all_gather(self, tensor: Tensor, what: str, timeout: float) -> Tensor:
        """(size, *tensor.shape): every rank's ``tensor``, in rank order."""
        out = [torch.empty_like(tensor) for _ in range(self.size)]
        start = time.monotonic()
        try:
            dist.all_gather(out, tensor.contiguous(), group=self.group, async_op=True).wait(
                _timedelta(timeout))
        except RuntimeError as exc:
            raise self._collective_fail(what, exc, start, timeout) from exc
        return torch.stack(out)

    def all_reduce_(self, tensor: Tensor, what: str, timeout: float) -> Tensor:
        """In-place sum over the group."""
        start = time.monotonic()
        try:
            dist.all_reduce(tensor, group=self.group, async_op=True).wait(_timedelta(timeout))
        except RuntimeError as exc:
            raise self._collective_fail(what, exc, start, timeout) from exc
        return tensor

    def _collective_fail(self, what: str, exc: Exception, start: float, timeout: float) -> TimeShardingError:
        return TimeShardingError(
            f"time-sharded rank {self.rank} of {self.size}: {what} failed after "
            f"{time.monotonic() - start:.1f} s (timeout {timeout:g} s): "
            f"{str(exc).splitlines()[0]}. A rank died or stalled; see the other ranks' logs.")


class NcclTransport(Transport):
    """NCCL point-to-point over ``cupy.cuda.nccl`` on PyTorch's current stream. The collectives
    (``all_gather``, ``all_reduce_``) go through ``torch.distributed`` on ``group``."""

    validates_every_call = False
    POLL_S = 0.005

    def __init__(self, group: Optional[dist.ProcessGroup], device: torch.device, store=None):
        from cupy.cuda import nccl
        self.nccl = nccl
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device = device
        store = store or dist.distributed_c10d._get_default_store()
        name = "default" if group is None else group.group_name
        key = f"sj_temporal_fusion/nccl_uid/{name}/{device.index}/{_NCCL_COUNT.setdefault(name, 0)}"
        _NCCL_COUNT[name] += 1
        if self.rank == 0:
            uid = nccl.get_unique_id()
            store.set(key, bytes(b % 256 for b in uid))
        raw = store.get(key)
        uid = tuple(b - 256 if b > 127 else b for b in raw)  # NCCL's id is 128 signed chars
        with torch.cuda.device(device):
            self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.error: Optional[TimeShardingError] = None
        self._send_stream: Optional[torch.cuda.Stream] = None
        self._watch: list[tuple[torch.cuda.Event, float, int, str, bool, float]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watchdog, daemon=True)
        self._thread.start()

    def _watchdog(self) -> None:
        while self.error is None:
            time.sleep(self.POLL_S)
            now = time.monotonic()
            with self._lock:
                self._watch = [w for w in self._watch if not w[0].query()]
                late = next((w for w in self._watch if now - w[1] > w[5]), None)
            if late is not None:
                _, start, peer, what, is_send, timeout = late
                self.error = self.fail(peer, what, "the NCCL operation did not complete", is_send,
                                       now - start, timeout)
                self.comm.abort()  # frees the stream held by the stuck operation
                return

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _enqueue(self, ops_: list[tuple[str, Tensor, int, str]], timeout: float) -> None:
        """One NCCL group. A group of sends alone runs on a side stream, so the compute stream
        does not stall until the receiver posts its receive (a rank's next layer goes on)."""
        self._check()
        current = torch.cuda.current_stream(self.device)
        stream = current
        if all(op == "send" for op, *_ in ops_):
            if self._send_stream is None:
                self._send_stream = torch.cuda.Stream(self.device)
            stream = self._send_stream
            stream.wait_stream(current)
            for _, tensor, _, _ in ops_:
                tensor.record_stream(stream)  # the allocator keeps it until the send is done
        self.nccl.groupStart()
        for op, tensor, peer, _ in ops_:
            fn = self.comm.send if op == "send" else self.comm.recv
            fn(tensor.data_ptr(), tensor.numel() * tensor.element_size(), self.nccl.NCCL_UINT8, peer,
               stream.cuda_stream)
        self.nccl.groupEnd()
        event = torch.cuda.Event()
        event.record(stream)
        with self._lock:
            for op, _, peer, what in ops_:
                self._watch.append((event, time.monotonic(), peer, what, op == "send", timeout))

    def send(self, tensor: Tensor, peer: int, tag: int, what: str, timeout: float):
        self._enqueue([("send", tensor, peer, what)], timeout)
        return tensor

    def recv(self, tensor: Tensor, peer: int, tag: int, what: str, timeout: float):
        self._enqueue([("recv", tensor, peer, what)], timeout)
        return tensor

    def exchange(self, sends: list, recvs: list, tag: int, timeout: float) -> None:
        """Sends and receives, (tensor, peer, what) each, in one NCCL group: issued apart, ranks
        that each send before they receive would block one another on their streams."""
        ops_ = [("send", *s) for s in sends] + [("recv", *r) for r in recvs]
        if ops_:
            self._enqueue(ops_, timeout)

    def wait(self, pending) -> Tensor:
        self._check()  # stream-ordered: later kernels on the stream wait for the transfer
        return pending

    def flush(self) -> None:
        self._check()

    def retire(self) -> None:
        self._check()

    def all_gather(self, tensor: Tensor, what: str, timeout: float) -> Tensor:
        self._check()
        out = torch.empty((self.size,) + tuple(tensor.shape), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather_into_tensor(out, tensor.contiguous(), group=self.group)
        return out

    def all_reduce_(self, tensor: Tensor, what: str, timeout: float) -> Tensor:
        self._check()
        dist.all_reduce(tensor, group=self.group)
        return tensor


_NCCL_COUNT: dict = {}
_TRANSPORTS: dict = {}


def transport_for(device: torch.device, group: Optional[dist.ProcessGroup]) -> Transport:
    """The transport of ``group`` for tensors on ``device`` (one per group and device, shared by
    every layer, so sends in flight are retired in one place)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "time sharding needs torch.distributed: call dist.init_process_group() first (gloo for "
            "CPU tensors, nccl for CUDA tensors) and launch one process per slice with torchrun")
    key = (id(group), device.type, device.index)
    transport = _TRANSPORTS.get(key)
    if transport is None:
        if device.type == "cuda":
            transport = NcclTransport(group, device)
        else:
            backend = str(dist.get_backend(group))
            if "gloo" not in backend:
                raise RuntimeError(
                    f"CPU tensors are time-sharded over gloo, but the process group's backend is "
                    f"'{backend}': init_process_group('gloo') (or 'cpu:gloo,cuda:nccl'), or pass "
                    f"group=dist.new_group(backend='gloo')")
            transport = GlooTransport(group)
        _TRANSPORTS[key] = transport
    return transport


def _forget_transports() -> None:
    """Drop cached transports (after destroy_process_group)."""
    _TRANSPORTS.clear()
