"""One switch for whole-network options: ``sj_temporal_fusion.optimize(net)``.

    net = sj_temporal_fusion.optimize(net)            # spike_bits=True
    sj_temporal_fusion.optimize(net, spike_bits=False)  # back to plain

What it changes: only forward hooks, on ``net`` (enter / leave the saved-tensor hooks around each
forward pass with gradients), on its SpikingJelly neurons (tag the spikes of those running
backend 'temporal_fusion') and on its max-pooling layers (tag their output when their input is
tagged). Parameters, buffers, ``state_dict`` keys and values, the step mode and the backends are
untouched, so checkpoints load with and without it, and the hooks pickle with the model.

Options:
    spike_bits  spikes that a later layer saves for its backward are kept as 1 bit per element
                and restored exactly (``spike_bits.py``): gradients are bit for bit those
                without it; activation memory of a Spiking-ResNet drops by the spike tensors'
                31/32. Costs one pass to pack each saved spike tensor and one to unpack it.
    fold_bn     BatchNorm folded into the neuron kernel: not available yet (it needs a kernel
                change that comes with the neuron-generic core); True raises NotImplementedError.
"""
from __future__ import annotations

import threading
import warnings

import torch

from . import spike_bits as _bits

BACKEND = "temporal_fusion"
_open = threading.local()  # per thread: the sessions opened by root pre-hooks, innermost last


def _sessions() -> list:
    if not hasattr(_open, "stack"):
        _open.stack = []
    return _open.stack


class _EnterSaving:
    """Root forward pre-hook: opens a spike-bits session when gradients are on (nothing is saved
    for backward otherwise)."""

    def __call__(self, module, args):
        session = _bits._session() if torch.is_grad_enabled() else None
        if session is not None:
            session.__enter__()
        _sessions().append(session)


class _LeaveSaving:
    """Root forward hook, registered with always_call=True so that a forward that raises still
    closes its session."""

    def __call__(self, module, args, output):
        stack = _sessions()
        if stack:
            session = stack.pop()
            if session is not None:
                session.__exit__(None, None, None)


class _TagSpikes:
    """Neuron forward hook: its output is a spike tensor when it ran our kernels."""

    def __call__(self, module, args, output):
        if getattr(module, "backend", None) == BACKEND and _bits.active():
            _bits.tag(output)


class _TagSelection:
    """Max-pool forward hook: max of spikes is a spike."""

    def __call__(self, module, args, output):
        if _bits.active() and args:
            _bits.tag_selection(args[0], output)


def _neuron_classes() -> tuple:
    from .spikingjelly import NODES
    return NODES


def optimize(net: torch.nn.Module, spike_bits: bool = True, fold_bn: bool = False) -> torch.nn.Module:
    """Switch whole-network options on ``net`` (a SpikingJelly model whose neurons run backend
    'temporal_fusion'); returns ``net`` itself. Calling it again replaces the earlier options;
    ``optimize(net, spike_bits=False)`` removes everything it added. See the module docstring."""
    if fold_bn:
        raise NotImplementedError(
            "fold_bn=True: folding BatchNorm into the neuron kernel is not available in this "
            "version (it needs the neuron-generic kernel core); use fold_bn=False")
    _remove(net)
    if not spike_bits:
        return net
    net.register_forward_pre_hook(_EnterSaving())
    net.register_forward_hook(_LeaveSaving(), always_call=True)
    found = False
    for module in net.modules():
        if isinstance(module, _neuron_classes()):
            module.register_forward_hook(_TagSpikes())
            found = found or getattr(module, "backend", None) == BACKEND
        elif isinstance(module, (torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.MaxPool3d)) \
                and not module.return_indices:
            module.register_forward_hook(_TagSelection())
    if not found:
        warnings.warn("optimize(spike_bits=True): no neuron of this network runs backend "
                      "'temporal_fusion' yet, so no spikes will be packed until one does: call "
                      "spikingjelly.activation_based.functional.set_backend(net, 'temporal_fusion')",
                      stacklevel=2)
    return net


_HOOKS = (_EnterSaving, _LeaveSaving, _TagSpikes, _TagSelection)


def _remove(net: torch.nn.Module) -> None:
    # Found by type, not by stored handles, so that it works on deep copies and unpickled models.
    for module in net.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook_id in [k for k, hook in hooks.items() if isinstance(hook, _HOOKS)]:
                del hooks[hook_id]
                module._forward_hooks_always_called.pop(hook_id, None)
                module._forward_hooks_with_kwargs.pop(hook_id, None)


def optimized(net: torch.nn.Module) -> dict:
    """The options ``optimize`` set on ``net``: {'spike_bits': bool, 'fold_bn': False}."""
    return {"spike_bits": any(isinstance(h, _EnterSaving) for h in net._forward_pre_hooks.values()),
            "fold_bn": False}
