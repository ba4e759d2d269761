"""``NcclTransport``: CUDA tensors through CuPy's ``cupy.cuda.nccl`` communicator on PyTorch's
current stream (``SJ_TF_SHARD_TRANSPORT=cupy``, or a group without NCCL). The NCCL unique id goes
through the ``torch.distributed`` store, so it works across nodes. NCCL waits on the stream, not
the host: a watchdog thread polls one event per operation and NCCL's asynchronous error, and past
the timeout aborts the communicator and records the error, which the next call on the host raises.

The NCCL module and the device side (``cuda_streams.CudaStreams``) are parameters, so the tests
run this class on CPU tensors under NCCL's rules (tests/_nccl_emulation.py)."""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .cuda_streams import CudaStreams, indexed
from .errors import DEFAULT_TIMEOUT, TimeShardingError, as_timedelta, first_line
from .transport import Transport


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
            return None, (f"CuPy is not installed ({first_line(exc)}): pip install "
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

    ``nccl`` and ``streams`` default to ``cupy.cuda.nccl`` and ``CudaStreams(device)``; tests pass
    stand-ins (tests/_nccl_emulation.py) to run this class on CPU tensors under NCCL's rules."""

    POLL_S = 0.002

    def __init__(self, group: Optional[dist.ProcessGroup], device: torch.device,
                 timeout: float = DEFAULT_TIMEOUT, *, nccl=None, streams=None, store=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device = indexed(device)  # the init and watchdog threads select it: it needs an index
        self.streams = streams if streams is not None else CudaStreams(self.device)
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
            store.wait(keys, as_timedelta(timeout))
        except Exception as exc:  # the store raises its own timeout type (DistStoreError)
            missing = [k.rsplit("/", 1)[-1] for k in keys if not store.check([k])]
            raise self._setup_error(f"{what}: no answer within {timeout:g} s from {', '.join(missing)} "
                                    f"({first_line(exc)}). Those ranks died, stalled, or did not "
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
            raise self._setup_error(f"NcclCommunicator: {first_line(result['error'])}") from result["error"]
        return nccl, result["comm"]

    # -- the watchdog

    def _watchdog(self) -> None:
        try:
            self.streams.set_device()  # querying an event from a thread on GPU 0 would make a context there
        except Exception as exc:
            self.error = self._setup_error(f"the watchdog cannot select the device: {first_line(exc)}")
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
                    f"error: {first_line(exc)}. A peer died, or the ranks' operations went out of "
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
                self.error = self._refused(peer, what, watched.is_send, exc)
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

    def _refused(self, peer: int, what: str, is_send: bool, exc: BaseException) -> TimeShardingError:
        """NCCL rejected this rank's own call at once (a receive from this rank itself without a
        send to itself in the same group is one: ncclInvalidUsage), or the communicator had failed."""
        direction = "sending to" if is_send else "receiving from"
        return TimeShardingError(
            f"time-sharded rank {self.rank} of {self.size}: {direction} rank {peer}: NCCL refused "
            f"{what} when it was enqueued: {first_line(exc)}. The call itself was rejected, nothing "
            f"was waited for (NCCL_DEBUG=WARN prints NCCL's reason; NCCL refuses a send to or a "
            f"receive from this rank itself without its counterpart in the same group). Peers may "
            f"now wait for this rank, so the communicator is aborted and this transport raises "
            f"from now on.")

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

