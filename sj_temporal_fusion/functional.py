"""The documented functional surface: one fused call runs a whole (T, N, *) sequence."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops, surrogate as surrogate_specs
from .ops import Kind

KINDS = {"if": Kind.IF, "lif": Kind.LIF, "plif": Kind.PLIF}


def check_input(x_seq: Tensor, v_init: Optional[Tensor], w: Optional[Tensor] = None) -> None:
    """Raise a clear error for inputs the kernels cannot take."""
    if not isinstance(x_seq, Tensor):
        raise TypeError(f"x_seq must be a torch.Tensor, got {type(x_seq).__name__}")
    if x_seq.dtype not in ops.SUPPORTED_DTYPES:
        raise TypeError(
            f"backend 'temporal_fusion' takes float16, bfloat16, float32 or float64 inputs, got "
            f"{x_seq.dtype}: convert the input first, e.g. x.float()")
    if x_seq.dim() < 1 or x_seq.shape[0] == 0:
        raise ValueError(f"x_seq must have shape (T, *) with T >= 1, got {tuple(x_seq.shape)}")
    if x_seq.device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend 'temporal_fusion' runs on CPU and CUDA tensors, got {x_seq.device}")
    if x_seq.is_cuda:
        from ._cuda import import_cupy
        import_cupy()
    for name, t in (("v_init", v_init), ("w", w)):
        if t is not None and t.device != x_seq.device:
            raise ValueError(f"{name} is on {t.device} but x_seq is on {x_seq.device}: "
                             f"move them to one device")
    if v_init is not None and v_init.shape != x_seq.shape[1:]:
        raise ValueError(
            f"the membrane state has shape {tuple(v_init.shape)} but each input step has shape "
            f"{tuple(x_seq.shape[1:])}; a stored state matches only inputs of its own shape: call "
            f"spikingjelly.activation_based.functional.reset_net(net) before changing the input shape")


def lif_multi_step(x_seq: Tensor, v_init: Optional[Tensor] = None, *, kind: str = "lif",
                   tau: float = 2.0, w: Optional[Tensor] = None, decay_input: bool = True,
                   v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                   detach_reset: bool = False, surrogate_function=None,
                   store_v_seq: bool = False) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Run an IF / LIF / ParametricLIF neuron over a whole sequence in one fused kernel.

    x_seq: (T, *) input currents; v_init: (*) initial membrane potential (default: v_reset, or 0
    for soft reset). ``kind`` is 'if', 'lif' (uses ``tau``) or 'plif' (uses the learnable 0-dim
    ``w``, decay sigmoid(w)). ``v_reset=None`` selects soft reset. Dynamics, options and
    gradients are those of SpikingJelly 0.0.0.0.14's IFNode / LIFNode / ParametricLIFNode.

    Returns (spike_seq (T, *), v_last (*), v_seq (T, *) if ``store_v_seq`` else None), all in
    x_seq's dtype; gradients flow to x_seq, v_init and w.
    """
    neuron = KINDS.get(kind)
    if neuron is None:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if neuron == Kind.PLIF and not isinstance(w, Tensor):
        raise ValueError("kind='plif' needs the learnable w tensor (decay = sigmoid(w))")
    if neuron == Kind.LIF and not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    check_input(x_seq, v_init, w if neuron == Kind.PLIF else None)
    sg = surrogate_specs.spec(surrogate_function)
    hard_reset = v_reset is not None
    T, shape = x_seq.shape[0], x_seq.shape[1:]
    x = x_seq.reshape(T, -1).contiguous()
    if v_init is None:
        v = x.new_full((x.shape[1],), float(v_reset) if hard_reset else 0.0)
    else:
        v = v_init.to(x.dtype).reshape(-1).contiguous()
    tau_value = float(tau) if neuron == Kind.LIF else 1.0
    keep = 1.0 - 1.0 / tau_value  # LIF's v * (1 - 1/tau), computed in double as SpikingJelly does
    k_tensor = None
    if neuron == Kind.PLIF:  # (k, 1 - k) in w's dtype, as ParametricLIFNode computes them
        k = w.sigmoid().reshape(1)
        k_tensor = torch.cat([k, 1.0 - k]).to(ops.state_dtype(x.dtype))
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or v.requires_grad or (k_tensor is not None and k_tensor.requires_grad))
    spike, v_last, v_seq, _ = ops.lif_forward(
        x, v, k_tensor, tau_value, keep, float(v_threshold), float(v_reset) if hard_reset else 0.0,
        int(neuron), bool(decay_input), hard_reset, bool(detach_reset), sg.id, sg.a, sg.b,
        bool(store_v_seq), needs_grad)
    return (spike.reshape(x_seq.shape), v_last.reshape(shape),
            v_seq.reshape(x_seq.shape) if store_v_seq else None)
