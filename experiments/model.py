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
from torch import nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from spikingjelly.activation_based.model import spiking_resnet

import sj_temporal_fusion  # noqa: F401  (registers backend 'temporal_fusion')
from sj_temporal_fusion.distributed import TimeSyncBatchNorm

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


def convert_sync_batchnorm(net: nn.Module) -> nn.Module:
    """Replace every layer.BatchNorm2d of ``net`` by the package's synchronised batch norm
    (``sj_temporal_fusion.distributed.TimeSyncBatchNorm``, the one implementation), which in
    training normalises with the statistics of the global batch of all processes.

    torch.nn.SyncBatchNorm refuses CPU tensors (gloo) and takes dim 1 as channels, which in
    multi-step mode is the batch; this one flattens (T, B) first, like SpikingJelly, and works on
    any device. Its backward sums the statistics' gradients over the processes, so N processes
    compute what one process would. It takes over the same parameter and buffer tensors."""
    for name, child in net.named_children():
        if type(child) is layer.BatchNorm2d:
            setattr(net, name, TimeSyncBatchNorm(child, name=name))
        else:
            convert_sync_batchnorm(child)
    return net
