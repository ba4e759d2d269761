"""NCCL's rules on the CPU (test code): a stand-in for CuPy's ``cupy.cuda.nccl`` module and for the
CUDA streams of ``NcclTransport``, so the CuPy NCCL transport and the node's protocol run in CI.

What is emulated, because the node must survive it on GPUs:
  * point-to-point messages pair by issue order per (sender, receiver) and tags do not exist:
    messages travel over a gloo group with one tag, so a rank that sends one message more than
    its peer receives shifts every later message (gloo then fails on the size mismatch, NCCL
    would hang or corrupt);
  * operations between ``groupStart`` and ``groupEnd`` are issued together at ``groupEnd``; an
    unclosed group swallows every later operation of that thread (``open_groups`` shows it);
  * a rank's messages to itself pair within one group only: a receive from itself without a
    send to itself in the same group (or the reverse) is refused at once with
    NCCL_ERROR_INVALID_USAGE and nothing of the group runs, as NCCL's ncclGroupEnd refuses it
    ("Trying to recv to self without a matching send"); a lone operation is a group of one;
  * CuPy 14's set-up signatures (``get_unique_id() -> bytes``, ``NcclCommunicator(ndev, commId:
    bytes, rank)``) or CuPy 13's (a tuple of 128 signed chars), a missing library
    (``available = False``), ranks passing different ids (NCCL would hang: here an error);
  * a communicator used from two threads at once (``violations``), ``abort`` completing every
    pending operation (its buffers then hold whatever they held), ``check_async_error``;
  * streams: operations complete in order on their stream, and ``HostStreams`` makes the host
    wait where a GPU stream would order later kernels (``host_follows_stream``).

Faults for tests: ``init_delay_s`` (a rank whose ncclCommInitRank does not return),
``fail_on_send`` (the n-th send raises), ``enqueue_delay_s`` (a slow host enqueue).
"""
from __future__ import annotations

import ctypes
import itertools
import os
import threading
import time
import zlib
from typing import Optional

import torch
import torch.distributed as dist

NCCL_UINT8 = 1


class NcclError(RuntimeError):
    pass


def _view(ptr: int, nbytes: int) -> torch.Tensor:
    """The host memory at ``ptr`` as a uint8 tensor (no copy)."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=torch.uint8)


class _Stream:
    _handles = itertools.count(1)

    def __init__(self, name: str):
        self.name = name
        self.handle = next(self._handles)
        self.ops: list = []
        _STREAMS[self.handle] = self


_STREAMS: dict = {}


class _Event:
    def __init__(self, ops):
        self.ops = ops


class HostStreams:
    """``NcclTransport``'s device side on the CPU: a current and a side stream whose operations
    complete in order; the host waits where a GPU stream would make later kernels wait."""

    host_follows_stream = True

    def __init__(self):
        self._current = _Stream("current")
        self._side: Optional[_Stream] = None
        self.device_threads: set = set()   # threads that selected the device
        self.query_threads: set = set()    # threads that queried an event

    def set_device(self) -> None:
        self.device_threads.add(threading.get_ident())

    def current(self) -> _Stream:
        return self._current

    def side(self) -> _Stream:
        if self._side is None:
            self._side = _Stream("side")
        return self._side

    @staticmethod
    def handle(stream: _Stream) -> int:
        return stream.handle

    @staticmethod
    def order(first: _Stream, then: _Stream) -> None:
        then.ops.extend(op for op in first.ops if not op.done())

    @staticmethod
    def keep(tensor, stream) -> None:
        pass  # the transport holds the tensor until the operation completes

    @staticmethod
    def record(stream: _Stream) -> _Event:
        stream.ops = [op for op in stream.ops if not op.done()]
        return _Event(list(stream.ops))

    def done(self, event: _Event) -> bool:
        self.query_threads.add(threading.get_ident())
        return all(op.done() for op in event.ops)


class _Op:
    """One send or receive on ``stream``: over gloo (another rank), or paired with its
    counterpart in the same group (to itself)."""

    def __init__(self, comm, kind: str, buf: torch.Tensor, peer: int, stream: int):
        self.comm, self.kind, self.buf, self.peer, self.stream = comm, kind, buf, peer, stream
        self.matched = False

    def to_self(self) -> bool:
        return self.peer == self.comm.rank

    def issue(self) -> None:
        comm = self.comm
        fn = dist.isend if self.kind == "send" else dist.irecv
        # One tag for everything: pairs form in issue order, as NCCL pairs them.
        work = fn(self.buf, dist.get_global_rank(comm.wire, self.peer), group=comm.wire, tag=0)
        # gloo's point-to-point work reports completion only from wait(): wait in a thread.
        threading.Thread(target=self._wait, args=(work,), daemon=True).start()

    def _wait(self, work) -> None:
        try:
            work.wait()
        except RuntimeError as exc:  # gloo: a size mismatch, a dead peer
            self.comm.async_error = self.comm.async_error or f"{self.kind} with rank {self.peer}: {exc}"
        self.matched = True

    def done(self) -> bool:
        return self.matched or self.comm.aborted


class EmulatedNccl:
    """Module-like stand-in for ``cupy.cuda.nccl``: ``api`` 14 or 13 picks CuPy's set-up
    signatures. Pass it as ``NcclTransport(..., nccl=EmulatedNccl(), streams=HostStreams())``."""

    NCCL_UINT8 = NCCL_UINT8
    NcclError = NcclError

    def __init__(self, api: int = 14, available: bool = True, init_delay_s: float = 0.0,
                 fail_on_send: Optional[int] = None, enqueue_delay_s: float = 0.0):
        self.api, self.available = api, available
        self.init_delay_s, self.fail_on_send, self.enqueue_delay_s = init_delay_s, fail_on_send, enqueue_delay_s
        self._local = threading.local()
        self.communicators: list = []
        module = self

        class NcclCommunicator(_Communicator):
            def __init__(self, ndev, commId, rank):
                super().__init__(module, ndev, commId, rank)

        self.NcclCommunicator = NcclCommunicator

    def get_unique_id(self):
        raw = os.urandom(128)
        if self.api >= 14:
            return raw
        return tuple(b - 256 if b > 127 else b for b in raw)

    def _group(self) -> list:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def groupStart(self) -> None:
        self._group().append([])

    def groupEnd(self) -> None:
        stack = self._group()
        if not stack:
            raise NcclError("groupEnd without groupStart")
        ops = stack.pop()
        if stack:
            stack[-1].extend(ops)
            return
        _launch(ops)

    def open_groups(self) -> int:
        """Groups this thread started and did not end."""
        return len(self._group())


INVALID_USAGE = "NCCL_ERROR_INVALID_USAGE: invalid usage (run with NCCL_DEBUG=WARN for details)"


def _launch(ops: list) -> None:
    """Run one group as ncclGroupEnd does. NCCL first pairs each communicator's messages to its
    own rank, send with receive in issue order, and refuses the whole group before anything runs
    when one is left over; then the group's operations join their streams."""
    pairs = []
    for comm in {id(op.comm): op.comm for op in ops}.values():
        sends = [op for op in ops if op.comm is comm and op.to_self() and op.kind == "send"]
        recvs = [op for op in ops if op.comm is comm and op.to_self() and op.kind == "recv"]
        if len(sends) != len(recvs):
            which = "recv to self without a matching send" if len(recvs) > len(sends) else \
                "send to self without a matching recv"
            raise NcclError(f"{INVALID_USAGE}; NCCL's warning: Trying to {which}")
        pairs += zip(sends, recvs)
    for op in ops:
        _STREAMS[op.stream].ops.append(op)
    for send, recv in pairs:
        send.comm._copy_to_self(send, recv)
    for op in ops:
        if not op.to_self():
            op.issue()


class _Communicator:
    def __init__(self, module: EmulatedNccl, ndev: int, commId, rank: int):
        if not module.available:
            raise AttributeError("module 'cupy.cuda.nccl' has no attribute 'NcclCommunicator'")
        want = bytes if module.api >= 14 else tuple
        if type(commId) is not want:
            raise TypeError(f"Argument 'commId' has incorrect type (expected {want.__name__}, got "
                            f"{type(commId).__name__})")
        raw = bytes(commId) if want is bytes else bytes(b % 256 for b in commId)
        if len(raw) != 128:
            raise NcclError(f"the unique id has {len(raw)} bytes, not 128")
        time.sleep(module.init_delay_s)
        self.module, self.size, self.rank = module, ndev, rank
        self.aborted = False
        self.async_error: Optional[str] = None
        self.violations: list = []
        self._busy = threading.Lock()
        self._sends = 0
        self.wire = None
        if ndev > 1:
            if dist.get_world_size() != ndev:
                raise NcclError("the emulation runs on the default process group: ndev must be its size")
            self.wire = dist.new_group(backend="gloo")
            ids = [None] * ndev
            dist.all_gather_object(ids, zlib.crc32(raw), group=self.wire)
            if len(set(ids)) != 1:  # NCCL would hang in ncclCommInitRank
                raise NcclError(f"ranks passed different unique ids (crc32 {ids})")
        module.communicators.append(self)

    def _enter(self, what: str) -> None:
        if not self._busy.acquire(blocking=False):
            self.violations.append(f"{what} while another thread used the communicator")
            self._busy.acquire()

    def _op(self, kind: str, ptr: int, count: int, datatype: int, peer: int, stream: int) -> None:
        self._enter(kind)
        try:
            if self.aborted:
                raise NcclError("the communicator was aborted")
            if datatype != NCCL_UINT8:
                raise NcclError("the emulation moves bytes (NCCL_UINT8) only")
            if not 0 <= peer < self.size:
                raise NcclError(f"peer {peer} is not in a communicator of {self.size}")
            if kind == "send":
                self._sends += 1
                if self.module.fail_on_send is not None and self._sends == self.module.fail_on_send:
                    raise NcclError("injected failure of a send (EmulatedNccl.fail_on_send)")
            time.sleep(self.module.enqueue_delay_s)
            op = _Op(self, kind, _view(ptr, count), peer, stream)
            stack = self.module._group()
            if stack:
                stack[-1].append(op)
            else:
                _launch([op])
        finally:
            self._busy.release()

    def send(self, sendbuf: int, count: int, datatype: int, peer: int, stream: int) -> None:
        self._op("send", sendbuf, count, datatype, peer, stream)

    def recv(self, recvbuf: int, count: int, datatype: int, peer: int, stream: int) -> None:
        self._op("recv", recvbuf, count, datatype, peer, stream)

    def _copy_to_self(self, send: _Op, recv: _Op) -> None:
        if send.buf.numel() != recv.buf.numel():
            self.async_error = f"a send of {send.buf.numel()} bytes met a receive of {recv.buf.numel()}"
        else:
            recv.buf.copy_(send.buf)
        send.matched = recv.matched = True

    def abort(self) -> None:
        self._enter("abort")
        try:
            self.aborted = True
        finally:
            self._busy.release()

    def check_async_error(self) -> None:
        if self.async_error is not None:
            raise NcclError(self.async_error)


def nccl_transport(device: torch.device, timeout: float, group=None, **emulation):
    """``NcclTransport`` over this emulation (``emulation``: ``EmulatedNccl``'s keyword arguments),
    with the host standing in for the CUDA streams."""
    from sj_temporal_fusion.distributed.nccl_transport import NcclTransport
    return NcclTransport(group, device, timeout, nccl=EmulatedNccl(**emulation), streams=HostStreams())
