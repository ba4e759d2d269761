"""One transport per process group and device, shared by every layer (so sends in flight are
retired in one place): ``transport_for`` makes or returns it, ``use_transport`` installs one (tests,
the smoke run), ``close_transports`` flushes and drops them all; an ``atexit`` hook flushes what a
process leaves in flight."""
from __future__ import annotations

import atexit
import os
import sys
from typing import Optional

import torch
import torch.distributed as dist

from .cuda_streams import indexed
from .errors import DEFAULT_TIMEOUT
from .nccl_transport import NcclTransport
from .torch_transport import TorchTransport
from .transport import Transport

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
    device = indexed(device)  # torch.device('cuda') and cuda:0 are one transport
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
    run on the CPU put an emulated NCCL transport on CPU tensors this way)."""
    device = indexed(device)
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
