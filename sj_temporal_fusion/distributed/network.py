"""Whole SpikingJelly multi-step networks, time-sharded: every neuron layer becomes a
``TimeShardedNode``, batch norm takes its statistics over the whole time group, and the helpers
below reduce outputs over time and sum parameter gradients, so a training step on k ranks equals
the one-device step (to rounding).

Convention: every rank computes the same loss from time-reduced outputs (``time_mean``), and
every parameter is used before that reduction (as in SpikingJelly's models, whose classifier runs
per time step). Each rank's parameter gradients then hold its slice's part; ``sync_gradients``
sums them.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from spikingjelly.activation_based import base, layer
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..frontends.activation_based import NODES, fusable
from .node import TimeShardedNode
from .collectives import all_gather, all_reduce_
from .errors import DEFAULT_TIMEOUT


class _AllGather(torch.autograd.Function):
    """(size, *x.shape). Every rank uses all rows, so the gradient of its own row is the sum over
    ranks of the gradients of that row."""

    @staticmethod
    def forward(ctx, x, group, what, timeout):
        ctx.group, ctx.what, ctx.timeout = group, what, timeout
        return all_gather(x, group, what, timeout)

    @staticmethod
    def backward(ctx, grad):
        grad = all_reduce_(grad.contiguous().clone(), ctx.group, ctx.what + " (backward)", ctx.timeout)
        return grad[dist.get_rank(ctx.group)], None, None, None


class _TimeSum(torch.autograd.Function):
    """Sum over the group; every rank computes the same loss from it, so each rank's share gets
    the loss's gradient unchanged (no reduction in the backward)."""

    @staticmethod
    def forward(ctx, x, group, what, timeout):
        return all_reduce_(x.clone(), group, what, timeout)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def time_sum(y_local: Tensor, group: Optional[dist.ProcessGroup] = None,
             timeout: float = DEFAULT_TIMEOUT) -> Tensor:
    """y_local (T_j, *) -> the sum over all T steps (*), the same on every rank."""
    return _TimeSum.apply(y_local.sum(0), group, "time_sum", timeout)


def time_mean(y_local: Tensor, group: Optional[dist.ProcessGroup] = None,
              timeout: float = DEFAULT_TIMEOUT) -> Tensor:
    """y_local (T_j, *) -> the mean over all T steps (*), the same on every rank (the usual
    ``y.mean(0)`` of a SpikingJelly classifier)."""
    T = all_reduce_(torch.tensor([float(y_local.shape[0])], device=y_local.device), group,
                    "time_mean: the total number of steps", timeout)
    return time_sum(y_local, group, timeout) / T.item()


class TimeSyncBatchNorm(nn.Module):
    """Batch norm whose training statistics cover every rank of ``group``: the (T*B, C, ...) batch
    of a time-sharded multi-step network, or the global batch of data-parallel training
    (``experiments/model.py`` uses it for that), as on one device. Takes over the parameters and
    buffers of ``bn`` (the same tensors, so an optimiser built before still holds them). Ranks
    exchange per-channel (count, mean, M2) and merge them in rank order (Chan et al.), which is as
    accurate as a two-pass variance; statistics are computed in at least fp32 (as batch norm
    under autocast). Evaluation uses the running statistics and exchanges nothing; so does a
    process without an initialised process group or in a group of one."""

    def __init__(self, bn: _BatchNorm, group: Optional[dist.ProcessGroup] = None, *,
                 name: str = "", timeout: float = DEFAULT_TIMEOUT):
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats = bn.affine, bn.track_running_stats
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.step_mode = getattr(bn, "step_mode", None)  # SpikingJelly's layer.BatchNorm*d
        self.group, self.name, self.timeout = group, name, timeout
        self.training = bn.training

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, name={self.name!r}"

    def forward(self, x: Tensor) -> Tensor:
        if self.step_mode == "m":
            return self._forward(x.flatten(0, 1)).reshape(x.shape)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if not self.training and self.track_running_stats:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        out_dtype = x.dtype
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        dims = [0] + list(range(2, x.dim()))
        n_local = x.numel() // x.shape[1]
        mean = x.mean(dims)
        m2 = (x - mean.reshape(1, -1, *([1] * (x.dim() - 2)))).square().sum(dims)
        count = torch.full_like(mean, float(n_local))
        stats = torch.stack([count, mean, m2])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            stats = _AllGather.apply(stats, self.group, f"batch norm '{self.name}' statistics",
                                     self.timeout)
        else:
            stats = stats.unsqueeze(0)
        counts, means, m2s = stats[:, 0], stats[:, 1], stats[:, 2]
        n = counts.sum(0)
        g_mean = (counts * means).sum(0) / n
        g_m2 = (m2s + counts * (means - g_mean).square()).sum(0)
        var = g_m2 / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                self.running_mean.mul_(1 - factor).add_(g_mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_((g_m2 / (n - 1)).detach(), alpha=factor)
        view = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - g_mean.reshape(view)) * torch.rsqrt(var + self.eps).reshape(view)
        if self.affine:
            y = y * self.weight.reshape(view) + self.bias.reshape(view)
        return y.to(out_dtype)


# Stateful SpikingJelly modules other than the three neurons carry state across time steps that
# time sharding would cut (synapse filters, delays, per-sequence dropout masks).
_UNSUPPORTED_MEMORY = (base.MemoryModule,)


def shard_network(net: nn.Module, group: Optional[dist.ProcessGroup] = None, *,
                  timeout: float = DEFAULT_TIMEOUT, T: Optional[int] = None) -> nn.Module:
    """Make ``net`` (a SpikingJelly multi-step network) time-sharded over ``group``, in place:
    every neuron the backend serves becomes a ``TimeShardedNode`` (one with two state variables,
    Izhikevich, is refused by name) named by its qualified name,
    every batch norm a ``TimeSyncBatchNorm``. Returns ``net``. Every rank must call this on the
    same architecture (layers are matched by order). Raises on stateful modules whose state would
    cross the slice boundary (other neuron types, synapse filters, delays, dropout that shares
    its mask over time)."""
    for qualified, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{qualified}.{child_name}" if qualified else child_name
            if isinstance(child, (TimeShardedNode, TimeSyncBatchNorm)):
                continue
            if isinstance(child, NODES) and fusable(child):
                setattr(module, child_name, TimeShardedNode(child, group, T=T, name=full, timeout=timeout))
            elif isinstance(child, _BatchNorm):
                setattr(module, child_name, TimeSyncBatchNorm(child, group, name=full, timeout=timeout))
            elif isinstance(child, _UNSUPPORTED_MEMORY):
                raise NotImplementedError(
                    f"shard_network: '{full}' ({type(child).__name__}) keeps state across time steps "
                    f"that time sharding cannot carry between ranks; supported stateful layers are "
                    f"the neurons with one state variable (IF, LIF, ParametricLIF, QIF, EIF, KLIF) "
                    f"with their stock dynamics"
                    + ("; layer.Dropout shares one mask over all T steps: use it on one device"
                       if isinstance(child, layer.Dropout) else ""))
    return net


def sync_gradients(params: Union[nn.Module, Iterable[nn.Parameter]],
                   group: Optional[dist.ProcessGroup] = None, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Sum every parameter's ``.grad`` over the group (one flat all-reduce per dtype and device)."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    buckets: dict = {}
    for p in params:
        if p.grad is not None:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for (_, device), grads in buckets.items():
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce_(flat, group, "sync_gradients", timeout)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
