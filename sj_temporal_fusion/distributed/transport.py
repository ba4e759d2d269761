"""Point-to-point transport between the ranks of a time group, with bounded waits.

Two engines (``transport_for`` picks one per group and device):
  * ``TorchTransport``: ``torch.distributed`` isend/irecv (``batch_isend_irecv`` for exchanges) on
    the group's own backend: gloo for CPU tensors, and NCCL for CUDA tensors when the group has an
    NCCL backend (the default; docs/time_sharding.md says why). Every wait is ``Work.wait(timeout)``.
  * ``NcclTransport``: CUDA tensors through CuPy's ``cupy.cuda.nccl`` communicator on PyTorch's
    current stream (``SJ_TF_SHARD_TRANSPORT=cupy``, or a group without NCCL). The NCCL unique id
    goes through the ``torch.distributed`` store, so it works across nodes. NCCL waits on the
    stream, not the host: a watchdog thread polls one event per operation and NCCL's asynchronous
    error, and past the timeout aborts the communicator and records the error, which the next
    call on the host raises.

NCCL pairs a rank's sends and receives with its peer's in issue order and ignores tags, so the
node's protocol (node.py) never lets whether a message is sent depend on a value only one rank
knows. ``nccl_emulation`` runs ``NcclTransport`` on CPU tensors under exactly those rules in CI.

Only N-element states move (never a whole sequence). Every failure is a ``TimeShardingError``
naming this rank, the peer, the layer and what was being exchanged.
"""
from __future__ import annotations

import atexit
import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT = float(os.environ.get("SJ_TF_SHARD_TIMEOUT", "300"))


class TimeShardingError(RuntimeError):
    """A peer of the time group died, stalled, or disagreed about shapes or layers."""


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------- collectives (any backend)

def _collective_fail(group, what: str, exc: BaseException, start: float, timeout: float) -> TimeShardingError:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    return TimeShardingError(
        f"time-sharded rank {rank} of {size}: {what} failed after {time.monotonic() - start:.1f} s "
        f"(timeout {timeout:g} s): {_first_line(exc)}. A rank died or stalled; see the other ranks' logs.")


def all_gather(tensor: Tensor, group: Optional[dist.ProcessGroup], what: str, timeout: float) -> Tensor:
    """(size, *tensor.shape): every rank's ``tensor``, in rank order, through ``torch.distributed``
    on ``group``; waits at most ``timeout`` s (``Work.wait(timeout)`` blocks the host on NCCL too)."""
    size = dist.get_world_size(group)
    start = time.monotonic()
    try:
        if tensor.device.type == "cuda":
            out = tensor.new_empty((size,) + tuple(tensor.shape))
            dist.all_gather_into_tensor(out, tensor.contiguous(), group=group, async_op=True).wait(
                _timedelta(timeout))
            return out
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous(), group=group, async_op=True).wait(_timedelta(timeout))
    except RuntimeError as exc:
        raise _collective_fail(group, what, exc, start, timeout) from exc
    return torch.stack(parts)


def all_reduce_(tensor: Tensor, group: Optional[dist.ProcessGroup], what: str, timeout: float) -> Tensor:
    """In-place sum over ``group``, waiting at most ``timeout`` s."""
    start = time.monotonic()
    try:
        dist.all_reduce(tensor, group=group, async_op=True).wait(_timedelta(timeout))
    except RuntimeError as exc:
        raise _collective_fail(group, what, exc, start, timeout) from exc
    return tensor


# ---------------------------------------------------------------- the interface

class Transport:
    """Ranks are ranks of the time group (0 .. size-1, in time order). ``send``/``recv`` return a
    handle for ``wait``; after ``wait`` a received tensor may be used by later device work (on
    NCCL that is stream order, the host does not wait). ``exchange(..., complete=True)`` also
    waits for the sends and lets the host read the received tensors."""

    rank: int
    size: int

    def fail(self, peer: int, what: str, cause: str, is_send: bool, waited: float,
             timeout: float) -> TimeShardingError:
        direction = "sending to" if is_send else "waiting for"
        return TimeShardingError(
            f"time-sharded rank {self.rank} of {self.size}: {direction} rank {peer}: {what} failed "
            f"after {waited:.1f} s (timeout {timeout:g} s): {cause}. Rank {peer} died, stalled, "
            f"or ran other layers or shapes than this rank; see its log. The timeout is "
            f"TimeShardedNode(timeout=...) or SJ_TF_SHARD_TIMEOUT.")

    def all_gather(self, tensor: Tensor, what: str, timeout: float) -> Tensor:
        return all_gather(tensor, self.group, what, timeout)

    def all_reduce_(self, tensor: Tensor, what: str, timeout: float) -> Tensor:
        return all_reduce_(tensor, self.group, what, timeout)

    def close(self) -> None:
        """Stop background work (NCCL's watchdog); the transport is unusable afterwards."""


# ---------------------------------------------------------------- torch.distributed

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
        self.device = device
        backend = str(dist.get_backend(group)).lower()
        self.over_nccl = device.type == "cuda" and "nccl" in backend
        self._sends: list[_Pending] = []

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _post(self, op, tensor, peer, tag, what, is_send, timeout) -> _Pending:
        try:
            work = op(tensor, self._global(peer), group=self.group, tag=tag)
        except RuntimeError as exc:
            raise self.fail(peer, what, _first_line(exc), is_send, 0.0, timeout) from exc
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
            pending.work.wait(_timedelta(left))
        except RuntimeError as exc:
            raise self.fail(pending.peer, pending.what, _first_line(exc), pending.is_send,
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
                raise self.fail(items[0][2], items[0][3], _first_line(exc), items[0][4], 0.0,
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


GlooTransport = TorchTransport  # the CPU engine's former name


# ---------------------------------------------------------------- CuPy NCCL

class _CudaStreams:
    """The device side of ``NcclTransport``: PyTorch's streams and events on ``device``
    (``nccl_emulation.HostStreams`` stands in for it on the CPU)."""

    host_follows_stream = False  # the GPU orders work on a stream; the host need not wait

    def __init__(self, device: torch.device):
        self.device = device
        self._side: Optional[torch.cuda.Stream] = None

    def set_device(self) -> None:
        torch.cuda.set_device(self.device)  # per thread: without it a thread works on GPU 0

    def current(self):
        return torch.cuda.current_stream(self.device)

    def side(self):
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    @staticmethod
    def handle(stream) -> int:
        return stream.cuda_stream

    @staticmethod
    def order(first, then) -> None:
        then.wait_stream(first)

    @staticmethod
    def keep(tensor: Tensor, stream) -> None:
        tensor.record_stream(stream)  # the allocator keeps it until the stream's work is done

    @staticmethod
    def record(stream):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    @staticmethod
    def done(event) -> bool:
        return event.query()


@dataclass
class _Op:
    """One watched NCCL group: ``event`` completes when the group has run on its stream."""
    start: float
    peer: int
    what: str
    is_send: bool
    timeout: float
    event: Any = None
    tensors: list = field(default_factory=list)  # alive until the group completes


def _load_nccl(nccl) -> tuple[Any, Optional[str]]:
    """(the nccl module, None) or (module or None, what is missing and how to get it)."""
    if nccl is None:
        try:
            from cupy.cuda import nccl
        except ImportError as exc:
            return None, (f"CuPy is not installed ({_first_line(exc)}): pip install "
                          f"'sj-temporal-fusion[cuda13]' (or [cuda12])")
    if not getattr(nccl, "available", True):
        return nccl, ("CuPy found no NCCL library (cupy.cuda.nccl.available is False): pip install "
                      "nvidia-nccl-cu13 (or nvidia-nccl-cu12, matching CuPy's CUDA), or put "
                      "libnccl.so.2 on LD_LIBRARY_PATH")
    return nccl, None


def _uid_bytes(uid) -> bytes:
    """NCCL's 128-byte unique id as bytes: CuPy >= 14 returns bytes, CuPy 13 a tuple of 128
    signed chars."""
    if isinstance(uid, (bytes, bytearray)):
        return bytes(uid)
    return bytes(b % 256 for b in uid)


def _communicator(nccl, size: int, uid: bytes, rank: int):
    """``NcclCommunicator`` from the id's bytes: CuPy >= 14 takes ``bytes``, CuPy 13 a tuple of
    signed chars. The argument's type is checked before NCCL is called, so trying one then the
    other has no side effect."""
    try:
        return nccl.NcclCommunicator(size, uid, rank)
    except TypeError as first:
        try:
            return nccl.NcclCommunicator(size, tuple(b - 256 if b > 127 else b for b in uid), rank)
        except TypeError as second:
            raise TypeError(f"NcclCommunicator takes neither bytes ({first}) nor a tuple "
                            f"({second}) as the unique id") from second


_NCCL_COUNT: dict = {}


class NcclTransport(Transport):
    """NCCL point-to-point over CuPy's ``nccl`` communicator on PyTorch's current stream. The
    collectives (``all_gather``, ``all_reduce_``) go through ``torch.distributed`` on ``group``.

    ``nccl`` and ``streams`` default to ``cupy.cuda.nccl`` and the CUDA device; tests pass
    ``nccl_emulation``'s stand-ins to run this class on CPU tensors under NCCL's rules."""

    POLL_S = 0.002

    def __init__(self, group: Optional[dist.ProcessGroup], device: torch.device,
                 timeout: float = DEFAULT_TIMEOUT, *, nccl=None, streams=None, store=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device = device
        self.streams = streams if streams is not None else _CudaStreams(device)
        self.error: Optional[TimeShardingError] = None
        self._closed = False
        self._lock = threading.Lock()       # guards _watch and _host_op
        self._comm_lock = threading.Lock()  # NCCL forbids concurrent use: enqueue vs the watchdog's abort
        self._watch: list[_Op] = []
        self._host_op: Optional[_Op] = None
        store = store or dist.distributed_c10d._get_default_store()
        self.nccl, self.comm = self._set_up(nccl, store, timeout)
        self._thread = threading.Thread(target=self._watchdog, daemon=True,
                                        name=f"sj_tf NCCL watchdog rank {self.rank}")
        self._thread.start()

    # -- set-up: every step bounded by ``timeout``, every rank told what went wrong

    def _setup_error(self, what: str) -> TimeShardingError:
        return TimeShardingError(f"time-sharded rank {self.rank} of {self.size}: setting up NCCL "
                                 f"for {self.device}: {what}")

    def _store_wait(self, store, keys: list, timeout: float, what: str) -> None:
        try:
            store.wait(keys, _timedelta(timeout))
        except Exception as exc:  # the store raises its own timeout type (DistStoreError)
            missing = [k.rsplit("/", 1)[-1] for k in keys if not store.check([k])]
            raise self._setup_error(f"{what}: no answer within {timeout:g} s from {', '.join(missing)} "
                                    f"({_first_line(exc)}). Those ranks died, stalled, or did not "
                                    f"run this layer") from exc

    def _set_up(self, nccl, store, timeout: float):
        # One key prefix per group and transport, the same on every rank whatever its device
        # (ranks sit on different GPUs, so a device index in the key would part them).
        name = "default" if self.group is None else self.group.group_name
        serial = _NCCL_COUNT.get(name, 0)
        _NCCL_COUNT[name] = serial + 1
        prefix = f"sj_temporal_fusion/nccl/{name}/{serial}"
        nccl, problem = _load_nccl(nccl)
        # Every rank says whether it can run NCCL, so a missing library fails every rank, with
        # the reason, instead of leaving the others waiting for an id that never comes.
        store.set(f"{prefix}/rank{self.rank}", problem or "ok")
        keys = [f"{prefix}/rank{r}" for r in range(self.size)]
        self._store_wait(store, keys, timeout, "every rank's NCCL check-in")
        missing = {r: store.get(k).decode() for r, k in enumerate(keys)}
        missing = {r: m for r, m in missing.items() if m != "ok"}
        if missing:
            raise self._setup_error("; ".join(f"rank {r}: {m}" for r, m in sorted(missing.items())))
        if self.rank == 0:
            store.set(f"{prefix}/uid", _uid_bytes(nccl.get_unique_id()))
        self._store_wait(store, [f"{prefix}/uid"], timeout, "NCCL's unique id from rank0")
        uid = store.get(f"{prefix}/uid")
        # ncclCommInitRank blocks until every rank has joined; in a thread, so the wait is bounded.
        result: dict = {}

        def init():
            try:
                self.streams.set_device()
                result["comm"] = _communicator(nccl, self.size, uid, self.rank)
            except BaseException as exc:  # reported on the calling thread
                result["error"] = exc

        thread = threading.Thread(target=init, daemon=True, name=f"sj_tf ncclCommInitRank {self.rank}")
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise self._setup_error(
                f"ncclCommInitRank did not return within {timeout:g} s: a rank died or stalled "
                f"after the check-in (every rank checked in); see the other ranks' logs. The "
                f"blocked initialisation stays behind in a daemon thread")
        if "error" in result:
            raise self._setup_error(f"NcclCommunicator: {_first_line(result['error'])}") from result["error"]
        return nccl, result["comm"]

    # -- the watchdog

    def _watchdog(self) -> None:
        try:
            self.streams.set_device()  # querying an event from a thread on GPU 0 would make a context there
        except Exception as exc:
            self.error = self._setup_error(f"the watchdog cannot select the device: {_first_line(exc)}")
            return
        while self.error is None and not self._closed:
            time.sleep(self.POLL_S)
            now = time.monotonic()
            with self._lock:
                self._watch = [op for op in self._watch if not self.streams.done(op.event)]
                late = next((op for op in self._watch if now - op.start > op.timeout), None)
                host = self._host_op
            if host is not None and now - host.start > host.timeout:
                self._fail(host, now, "this rank is stuck on the host inside NCCL's groupEnd (the "
                                      "first operation with a peer sets up its connection there)",
                           host_stuck=True)
                return
            try:
                self.comm.check_async_error()  # ncclCommGetAsyncError: thread-safe by NCCL's rules
            except Exception as exc:
                self._fail(None, now, "", error=TimeShardingError(
                    f"time-sharded rank {self.rank} of {self.size}: NCCL reported an asynchronous "
                    f"error: {_first_line(exc)}. A peer died, or the ranks' operations went out of "
                    f"step (different layers or shapes); see the other ranks' logs."))
                return
            if late is not None:
                self._fail(late, now, "the NCCL operation did not complete")
                return

    def _fail(self, op: Optional[_Op], now: float, cause: str, host_stuck: bool = False,
              error: Optional[TimeShardingError] = None) -> None:
        """Record the error (raised by the host's next call), then abort the communicator, which
        frees the streams held by its operations. The abort waits until no thread is enqueueing on
        the communicator, except when that thread is itself stuck inside NCCL (``host_stuck``):
        aborting is then the only way to free it."""
        self.error = error or self.fail(op.peer, op.what, cause, op.is_send, now - op.start, op.timeout)
        acquired = False
        while not host_stuck:
            acquired = self._comm_lock.acquire(timeout=self.POLL_S * 10)
            if acquired:
                break
            host = self._host_op
            if host is not None and time.monotonic() - host.start > host.timeout:
                break
        try:
            self.comm.abort()
        except Exception as exc:  # the recorded error says what happened; this is secondary
            print(f"sj_temporal_fusion: rank {self.rank}: ncclCommAbort failed: {exc}", file=sys.stderr)
        finally:
            if acquired:
                self._comm_lock.release()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    # -- operations

    def _enqueue(self, ops_: list, timeout: float) -> _Op:
        """One NCCL group of (op, tensor, peer, what). A group of sends alone runs on a side
        stream, so the compute stream does not stall until the receiver posts its receive (a
        rank's next layer goes on)."""
        self._check()
        current = self.streams.current()
        stream = current
        if all(op == "send" for op, *_ in ops_):
            stream = self.streams.side()
            self.streams.order(current, stream)
            for _, tensor, _, _ in ops_:
                self.streams.keep(tensor, stream)
        _, _, peer, what = ops_[0]
        watched = _Op(time.monotonic(), peer, what, ops_[0][0] == "send", timeout,
                      tensors=[t for _, t, _, _ in ops_])
        with self._comm_lock:
            self._host_op = watched
            try:
                self.nccl.groupStart()
                try:
                    for op, tensor, peer_, _ in ops_:
                        fn = self.comm.send if op == "send" else self.comm.recv
                        fn(tensor.data_ptr(), tensor.numel() * tensor.element_size(), self.nccl.NCCL_UINT8,
                           peer_, self.streams.handle(stream))
                finally:
                    self.nccl.groupEnd()  # an open group would swallow every later NCCL call of this thread
            except Exception as exc:
                if self.error is not None:  # the watchdog aborted under a stuck host: its error is the cause
                    raise self.error from exc
                # Part of the group may have been issued: this rank is out of step with its peers.
                self.error = self.fail(peer, what, f"enqueueing failed: {_first_line(exc)}",
                                       watched.is_send, 0.0, timeout)
                try:
                    self.comm.abort()
                finally:
                    raise self.error from exc
            finally:
                self._host_op = None
        watched.event = self.streams.record(stream)
        with self._lock:
            self._watch.append(watched)
        self._check()  # the watchdog may have given up while the host was inside NCCL
        return watched

    def _host_wait(self, op: _Op) -> None:
        """Block the host until ``op`` ran, or raise the watchdog's error (bounded by its timeout:
        the watchdog aborts the communicator, which completes the event)."""
        while not self.streams.done(op.event):
            self._check()
            time.sleep(self.POLL_S)
        self._check()  # after an abort the buffers hold garbage: never hand them out

    def send(self, tensor: Tensor, peer: int, tag: int, what: str, timeout: float) -> _Op:
        return self._enqueue([("send", tensor, peer, what)], timeout)

    def recv(self, tensor: Tensor, peer: int, tag: int, what: str, timeout: float) -> _Op:
        return self._enqueue([("recv", tensor, peer, what)], timeout)

    def wait(self, pending: _Op) -> Tensor:
        """Stream-ordered on the GPU: later kernels on the stream wait for the transfer."""
        if self.streams.host_follows_stream:
            self._host_wait(pending)
        self._check()
        return pending.tensors[0]

    def exchange(self, sends: list, recvs: list, tag: int, timeout: float, complete: bool = False) -> None:
        """Sends and receives, (tensor, peer, what) each, in one NCCL group: issued apart, ranks
        that each send before they receive would block one another on their streams."""
        ops_ = [("send", *s) for s in sends] + [("recv", *r) for r in recvs]
        if not ops_:
            return
        op = self._enqueue(ops_, timeout)
        if complete or self.streams.host_follows_stream:
            self._host_wait(op)

    def forward_done(self) -> None:
        self.retire()

    def flush(self) -> None:
        """Wait on the host for every operation still in flight (bounded by the watchdog)."""
        with self._lock:
            pending = list(self._watch)
        for op in pending:
            self._host_wait(op)
        self._check()

    def retire(self) -> None:
        self._check()

    def close(self) -> None:
        self._closed = True


_TRANSPORTS: dict = {}


def _flush_at_exit() -> None:
    """A process that returns from its last forward may still have a send in flight on NCCL's
    side stream; leaving would strand the receiver."""
    for transport in list(_TRANSPORTS.values()):
        try:
            transport.flush()
        except Exception as exc:
            print(f"sj_temporal_fusion: at exit, a time-sharding send did not complete: {exc}",
                  file=sys.stderr)


atexit.register(_flush_at_exit)


def _engine_for_cuda(group: Optional[dist.ProcessGroup]) -> str:
    choice = os.environ.get("SJ_TF_SHARD_TRANSPORT", "auto").lower()
    if choice not in ("auto", "torch", "cupy"):
        raise ValueError(f"SJ_TF_SHARD_TRANSPORT={choice!r}: use 'torch' (torch.distributed's NCCL "
                         f"group), 'cupy' (CuPy's NCCL communicator) or 'auto'")
    has_nccl = "nccl" in str(dist.get_backend(group)).lower()
    if choice == "torch" and not has_nccl:
        raise RuntimeError("SJ_TF_SHARD_TRANSPORT=torch needs a process group with an NCCL backend for "
                           "CUDA: init_process_group('nccl') or 'cpu:gloo,cuda:nccl'")
    return "torch" if choice == "torch" or (choice == "auto" and has_nccl) else "cupy"


def transport_for(device: torch.device, group: Optional[dist.ProcessGroup],
                  timeout: float = DEFAULT_TIMEOUT) -> Transport:
    """The transport of ``group`` for tensors on ``device`` (one per group and device, shared by
    every layer, so sends in flight are retired in one place). ``timeout`` bounds its set-up."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "time sharding needs torch.distributed: call dist.init_process_group() first (gloo for "
            "CPU tensors, nccl for CUDA tensors) and launch one process per slice with torchrun")
    key = (id(group), device.type, device.index)
    transport = _TRANSPORTS.get(key)
    if transport is None:
        if device.type == "cuda":
            if _engine_for_cuda(group) == "torch":
                transport = TorchTransport(group, device)
            else:
                transport = NcclTransport(group, device, timeout)
        else:
            backend = str(dist.get_backend(group))
            if "gloo" not in backend:
                raise RuntimeError(
                    f"CPU tensors are time-sharded over gloo, but the process group's backend is "
                    f"'{backend}': init_process_group('gloo') (or 'cpu:gloo,cuda:nccl'), or pass "
                    f"group=dist.new_group(backend='gloo')")
            transport = TorchTransport(group, device)
        _TRANSPORTS[key] = transport
    return transport


def use_transport(transport: Transport, device: torch.device,
                  group: Optional[dist.ProcessGroup] = None) -> None:
    """Make ``transport`` the one ``transport_for(device, group)`` returns (tests and the smoke
    run's dry run put an emulated NCCL transport on CPU tensors this way)."""
    _TRANSPORTS[(id(group), device.type, device.index)] = transport


def close_transports() -> None:
    """Before ``dist.destroy_process_group()``: wait for every send still in flight (as at exit),
    then close and drop every transport."""
    _flush_at_exit()
    _forget_transports()


def _forget_transports() -> None:
    """Drop cached transports (after destroy_process_group)."""
    for transport in _TRANSPORTS.values():
        transport.close()
    _TRANSPORTS.clear()
