"""The documented functional surface: one fused call runs a whole (T, *) sequence of any
registered neuron model (``neuron_multi_step``); ``lif_multi_step`` is its IF / LIF / PLIF form;
``batch_norm_scale_shift`` prepares a BatchNorm to be folded into the neuron's read of x."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import ops, surrogate as surrogate_specs
from .neurons import REGISTRY
from .neurons.base import NeuronModel


def check_input(x_seq: Tensor, states: Sequence[Optional[Tensor]], names: Sequence[str]) -> None:
    """Raise a clear error for inputs the kernels cannot take."""
    if not isinstance(x_seq, Tensor):
        raise TypeError(f"x_seq must be a torch.Tensor, got {type(x_seq).__name__}")
    if x_seq.dtype not in ops.SUPPORTED_DTYPES:
        raise TypeError(
            f"backend 'temporal_fusion' takes float16, bfloat16, float32 or float64 inputs, got "
            f"{x_seq.dtype}: convert the input first, e.g. x.float()")
    if x_seq.dim() < 1 or x_seq.shape[0] == 0:
        raise ValueError(
            f"x_seq must have shape (T, *) with T >= 1 time steps, got shape {tuple(x_seq.shape)}: in step "
            f"mode 'm' the first dimension is time (use step_mode='s' for one step of shape (N, *))")
    if x_seq.device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend 'temporal_fusion' runs on CPU and CUDA tensors, got {x_seq.device}")
    if x_seq.is_cuda:
        from ._cuda import import_cupy
        import_cupy()
    for name, state in zip(names, states):
        if state is None:
            continue
        if state.device != x_seq.device:
            raise ValueError(f"{name} is on {state.device} but x_seq is on {x_seq.device}: move them to one device")
        if state.shape != x_seq.shape[1:]:
            raise ValueError(
                f"the state {name} has shape {tuple(state.shape)} but each input step has shape "
                f"{tuple(x_seq.shape[1:])}; a stored state matches only inputs of its own shape: call "
                f"spikingjelly.activation_based.functional.reset_net(net) before changing the input shape")


_CONSTANT_PARAMS: dict = {}


def parameter_tensor(values: list, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, int]:
    """The kernel's parameter tensor in the state dtype, and the mask of its learnable entries.
    Constant parameter sets are built once per device (no host-to-device copy per call)."""
    mask = sum(1 << i for i, v in enumerate(values) if isinstance(v, Tensor) and v.requires_grad)
    if not any(isinstance(v, Tensor) for v in values):
        key = (tuple(values), dtype, device)
        if torch.compiler.is_compiling():
            return torch.tensor(values, dtype=dtype, device=device), 0
        cached = _CONSTANT_PARAMS.get(key)
        if cached is None:
            cached = _CONSTANT_PARAMS.setdefault(key, torch.tensor(values, dtype=dtype, device=device))
        return cached, 0
    entries = [v.to(device=device, dtype=dtype).reshape(()) if isinstance(v, Tensor)
               else torch.tensor(v, dtype=dtype, device=device) for v in values]
    return torch.stack(entries), mask


def batch_norm_scale_shift(x: Tensor, channel_dim: int, running_mean: Optional[Tensor],
                           running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                           training: bool, momentum: float, eps: float) -> tuple[Tensor, Tensor, int, int]:
    """A BatchNorm over x (channels at ``channel_dim``; the other arguments as
    ``torch.nn.functional.batch_norm`` takes them) as the per-channel affine the kernels apply
    while reading x: returns (scale, shift, inner, channels) for ``neuron_multi_step(fold_bn=...)``,
    scale and shift (channels,) in the state dtype, with autograd to x (through the batch
    statistics), weight and bias.

    training: statistics of this batch (biased variance), and the running statistics, if given,
    updated in place as ``F.batch_norm`` does (``momentum`` is its exponential average factor;
    the running variance takes the unbiased variance); else the running statistics.
    scale = weight / sqrt(var + eps), shift = bias - mean * scale (weight 1 and bias 0 if None)."""
    channels = x.shape[channel_dim]
    inner = math.prod(x.shape[channel_dim + 1:])
    acc = ops.state_dtype(x.dtype)
    if training:
        xc = x.reshape(-1, channels, inner).to(acc)
        n = xc.shape[0] * inner
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        mean, invstd, var = _BatchStatistics.apply(xc, eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum * n / (n - 1))
    else:
        mean, invstd = running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps)
    scale = invstd if weight is None else weight.to(acc) * invstd
    shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
    return scale.contiguous(), shift.contiguous(), inner, channels


class _BatchStatistics(torch.autograd.Function):
    """x (O, C, I) -> per-channel mean, 1 / sqrt(biased var + eps) and the biased var (not
    differentiable). The backward writes dL/dx in one pass, dL/dx = a[c] + b[c] * x (autograd
    through torch.var_mean would allocate several (O, C, I) temporaries: they set the step's peak
    memory at the largest layer)."""

    @staticmethod
    def forward(ctx, x, eps):
        # BatchNorm's own statistics pass (no output, no running statistics given): on the CPU 4x
        # faster than torch.var_mean over dims (0, 2), which walks the channel-strided layout.
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, mean, invstd)
        ctx.mark_non_differentiable(var)
        return mean, invstd, var

    @staticmethod
    def backward(ctx, grad_mean, grad_invstd, _grad_var):
        x, mean, invstd = ctx.saved_tensors
        n = x.shape[0] * x.shape[2]
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_invstd = torch.zeros_like(invstd) if grad_invstd is None else grad_invstd
        # d invstd / dx = -invstd^3 (x - mean) / n, d mean / dx = 1 / n
        b = -grad_invstd * invstd.pow(3) / n
        a = grad_mean / n - b * mean
        return torch.addcmul(a.view(1, -1, 1), b.view(1, -1, 1), x), None


def neuron_multi_step(x_seq: Tensor, state: Optional[Sequence[Optional[Tensor]]] = None, *,
                      model: str = "lif", surrogate_function=None, store_v_seq: bool = False,
                      fold_bn: Optional[tuple] = None, **options) -> tuple[Tensor, tuple, Optional[Tensor]]:
    """Run neuron model ``model`` (a key of ``neurons.REGISTRY``) over a whole sequence in one
    fused kernel.

    x_seq: (T, *) input currents; ``state``: one tensor (*) per state variable of the model (v, or
    v and w) or None for the model's initial state; ``options``: the node's options with
    SpikingJelly's names and defaults (``neurons.REGISTRY[model].defaults``). ``fold_bn``: the
    (scale, shift, inner, channels) of ``batch_norm_scale_shift``: the neuron then runs on the
    BatchNorm's output x_seq * scale[c] + shift[c] without it being written, x_seq being the
    BatchNorm's input; gradients flow to x_seq, scale and shift.

    Returns (spike_seq (T, *) in x_seq's dtype, the final state (a tuple, in the state dtype:
    fp32 for fp16/bf16/fp32 inputs, fp64 for fp64, so splitting a sequence over calls gives the
    result of one call), v_seq (T, *) if ``store_v_seq`` else None). Gradients flow to x_seq, the
    state and learnable options (tensors that require grad: PLIF's w, KLIF's k, v_threshold ...).
    """
    m = _model(model)
    unknown = set(options) - set(m.defaults)
    if unknown:
        raise TypeError(f"model {model!r} takes the options {sorted(m.defaults)}, got unknown {sorted(unknown)}")
    o = dict(m.defaults, **options)
    m.validate(o)
    states = tuple(state) if state is not None else (None,) * m.num_states
    if len(states) != m.num_states:
        raise ValueError(f"model {model!r} has state variables {m.states}; state must hold {m.num_states} "
                         f"tensors, got {len(states)}")
    check_input(x_seq, states, m.states)
    sg = surrogate_specs.spec(surrogate_function)
    acc = ops.state_dtype(x_seq.dtype)
    x = x_seq.contiguous()
    init = m.initial_state(o)
    z = [x.new_full(x.shape[1:], init[k], dtype=acc) if s is None else s.to(acc).contiguous()
         for k, s in enumerate(states)]
    aux = z[1] if m.num_states == 2 else x.new_empty((0,), dtype=acc)
    params, mask = parameter_tensor(m.param_values(o), acc, x.device)
    fold = () if fold_bn is None else tuple(fold_bn)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or mask != 0 or any(t.requires_grad for t in z)
                                              or any(isinstance(t, Tensor) and t.requires_grad for t in fold))
    spike, v_last, aux_last, v_seq, _ = ops.neuron_forward(
        x, z[0], aux, params, m.name, m.forward_form(o), m.form(o), sg.id, sg.a, sg.b, mask,
        bool(store_v_seq), needs_grad, *fold)
    final = (v_last, aux_last) if m.num_states == 2 else (v_last,)
    return spike, final, v_seq if store_v_seq else None


def _model(name: str) -> NeuronModel:
    if name not in REGISTRY:
        raise ValueError(f"model must be one of {sorted(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


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

    Returns (spike_seq (T, *) in x_seq's dtype, v_last (*) in the state dtype (fp32 for
    fp16/bf16/fp32, fp64 for fp64), v_seq (T, *) if ``store_v_seq`` else None); gradients flow to
    x_seq, v_init, w and a learnable v_threshold / v_reset.
    """
    spike, (v_last,), v_seq = neuron_multi_step(
        x_seq, None if v_init is None else (v_init,), model="lif", kind=kind, tau=tau, w=w,
        decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset, detach_reset=detach_reset,
        surrogate_function=surrogate_function, store_v_seq=store_v_seq)
    return spike, v_last, v_seq
