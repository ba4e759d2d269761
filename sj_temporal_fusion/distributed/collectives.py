"""Collectives over the whole time group, on any backend, each wait bounded: ``all_gather`` and
``all_reduce_`` through ``torch.distributed`` (``Work.wait(timeout)`` blocks the host on NCCL too)."""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import TimeShardingError, as_timedelta, first_line


def _collective_fail(group, what: str, exc: BaseException, start: float, timeout: float) -> TimeShardingError:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    return TimeShardingError(
        f"time-sharded rank {rank} of {size}: {what} failed after {time.monotonic() - start:.1f} s "
        f"(timeout {timeout:g} s): {first_line(exc)}. A rank died or stalled; see the other ranks' logs.")


def all_gather(tensor: Tensor, group: Optional[dist.ProcessGroup], what: str, timeout: float) -> Tensor:
    """(size, *tensor.shape): every rank's ``tensor``, in rank order, through ``torch.distributed``
    on ``group``; waits at most ``timeout`` s (``Work.wait(timeout)`` blocks the host on NCCL too)."""
    size = dist.get_world_size(group)
    start = time.monotonic()
    try:
        if tensor.device.type == "cuda":
            out = tensor.new_empty((size,) + tuple(tensor.shape))
            dist.all_gather_into_tensor(out, tensor.contiguous(), group=group, async_op=True).wait(
                as_timedelta(timeout))
            return out
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous(), group=group, async_op=True).wait(as_timedelta(timeout))
    except RuntimeError as exc:
        raise _collective_fail(group, what, exc, start, timeout) from exc
    return torch.stack(parts)


def all_reduce_(tensor: Tensor, group: Optional[dist.ProcessGroup], what: str, timeout: float) -> Tensor:
    """In-place sum over ``group``, waiting at most ``timeout`` s."""
    start = time.monotonic()
    try:
        dist.all_reduce(tensor, group=group, async_op=True).wait(as_timedelta(timeout))
    except RuntimeError as exc:
        raise _collective_fail(group, what, exc, start, timeout) from exc
    return tensor

