"""SpikingJelly's Spiking-ResNets with the paper's LIF neuron, on a chosen neuron backend.

The model is SpikingJelly's own ``spiking_resnet18/34/50`` in multi-step mode, input
(T, B, 3, H, W), output (T, B, classes); ``backend`` is set on every LIFNode and checked, because
SpikingJelly's ``set_backend`` only logs a warning and keeps the old backend when a node does not
support the new one.
"""
from __future__ import annotations

import importlib.util
from collections import Counter

import torch
import torch.distributed as dist
from torch import Tensor, nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from spikingjelly.activation_based.model import spiking_resnet

import sj_temporal_fusion  # noqa: F401  (registers backend 'temporal_fusion')

from .config import ConfigError


def check_backend(backend: str, device: torch.device) -> None:
    """Raise ConfigError, saying what to do, if ``backend`` cannot run on ``device``."""
    if backend == "cupy" and device.type != "cuda":
        raise ConfigError("backend 'cupy' runs on CUDA tensors only: use --device cuda on a GPU "
                          "machine, or --backend torch / temporal_fusion on the CPU")
    if backend in ("cupy", "temporal_fusion") and device.type == "cuda" \
            and importlib.util.find_spec("cupy") is None:
        raise ConfigError(f"backend {backend!r} on CUDA needs CuPy: pip install "
                          f"sj-temporal-fusion[cuda12] (or [cuda13], matching your CUDA)")


def build(config: dict, classes: int) -> nn.Module:
    """The config's Spiking-ResNet, multi-step, on the config's neuron backend (on the CPU)."""
    net = getattr(spiking_resnet, config["arch"])(
        num_classes=classes, spiking_neuron=neuron.LIFNode, tau=config["tau"],
        decay_input=config["decay_input"], v_threshold=config["v_threshold"],
        v_reset=config["v_reset"], detach_reset=config["detach_reset"],
        surrogate_function=surrogate.Sigmoid(alpha=config["surrogate_alpha"]))
    functional.set_step_mode(net, "m")
    functional.set_backend(net, config["backend"], instance=neuron.LIFNode)
    found = neuron_backends(net)
    if set(found) != {config["backend"]}:
        raise RuntimeError(f"asked for backend {config['backend']!r} but the LIF nodes run "
                           f"{dict(found)}: a node does not support it")
    return net


def neuron_backends(net: nn.Module) -> Counter:
    """How many LIF nodes run each backend, e.g. Counter({'temporal_fusion': 33})."""
    return Counter(m.backend for m in net.modules() if isinstance(m, neuron.LIFNode))


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes; the backward sums the gradients the same way, so each process
    receives d(sum of all processes' losses)/d(its input)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(layer.BatchNorm2d):
    """SpikingJelly's BatchNorm2d that, in training under torch.distributed, normalises with the
    mean and variance of the global batch (all processes), in fp32.

    torch.nn.SyncBatchNorm refuses CPU tensors (gloo) and takes dim 1 as channels, which in
    multi-step mode is the batch; this one flattens (T, B) first, like SpikingJelly, and works
    on any device. Statistics are summed with an all-reduce that the backward runs too, so the
    gradients include every process's contribution: N processes compute what one process would.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        flat = x.flatten(0, 1) if self.step_mode == "m" else x
        return self._global_batch_norm(flat).reshape(x.shape)

    def _global_batch_norm(self, x: Tensor) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = xf.new_tensor([xf.numel() / xf.shape[1]])
        totals = _AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centred = xf - mean[None, :, None, None]
        var = _AllReduceSum.apply((centred * centred).sum((0, 2, 3))) / n  # two-pass: no cancellation
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None \
                    else 1.0 / float(self.num_batches_tracked)  # cumulative average
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), momentum)  # unbiased
        return y.to(x.dtype)


def convert_sync_batchnorm(net: nn.Module) -> nn.Module:
    """Replace every layer.BatchNorm2d of ``net`` by a SyncBatchNorm2d with the same state."""
    for name, child in net.named_children():
        if type(child) is layer.BatchNorm2d:
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, step_mode=child.step_mode)
            reference = next(child.parameters(), None)
            if reference is not None:
                sync = sync.to(reference.device, reference.dtype)
            sync.load_state_dict(child.state_dict())
            setattr(net, name, sync)
        else:
            convert_sync_batchnorm(child)
    return net
