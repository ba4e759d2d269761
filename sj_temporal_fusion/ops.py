"""torch.library custom ops over the fused kernels, for every neuron model, with fake (meta)
implementations and registered autograd; the GPU build runs them for CUDA tensors, the host build
otherwise.

Layer names: ``sj_temporal_fusion::neuron_forward`` / ``neuron_backward`` / ``neuron_fixup`` (here)
-> ``functional.neuron_multi_step`` (and ``lif_multi_step``) -> the SpikingJelly neuron hook
(``spikingjelly.py``). Signatures carry plain values only and do not grow with the models: the
model is its registry name, its options a FORM integer and one parameter tensor.

BatchNorm folding (``bn_scale``, ``bn_shift``, ``bn_inner``, ``bn_channels``, optional on
``neuron_forward`` and ``neuron_backward``): the kernels read x_eff = x * scale[c] + shift[c] where
they read x, c = (i // inner) % channels for neuron i of a step (x (T, B, C, *) flattened,
inner = prod(*)); scale and shift are (channels,) in the state dtype. The backward's grad_x is
then dL/dx_eff, and the registered autograd takes it through the affine to x, scale and shift
(``functional.batch_norm_scale_shift`` builds scale and shift from a BatchNorm, with autograd to
its input, weight and bias).

Layouts: x and sequences (T, *); states (*) each, in the state dtype; v is the first state variable,
``aux`` the second (IzhikevichNode's w; an empty tensor for one-state models); checkpoints
(ceil(T / chunk), S, N) in the state dtype, chunk the model's checkpoint interval.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _cuda, _host, _huge_pages
from .neurons import REGISTRY
from .variants import backward_variant, fixup_variant, forward_variant

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the state inside the kernels and between calls: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_checkpoints(T: int, model: str) -> int:
    """Checkpoints of the state over T steps: one every ``chunk`` steps of the model (CHUNK)."""
    return -(-T // REGISTRY[model].chunk)


def launch(expression: str, x: Tensor, args: dict) -> None:
    """The one place a kernel is launched: GPU build for CUDA tensors, host build otherwise.
    ``args``: the kernel's parameters by name (``kernel_params.FIELDS``)."""
    n = x[0].numel() if x.dim() > 0 and x.shape[0] > 0 else 0
    if x.is_cuda:
        _cuda.launch(expression, x.device, n, args, x.dtype == torch.float64)
    else:
        _host.launch(expression, n, args, x.dtype == torch.float64)


def _check_params(params: Tensor, model: str, x: Tensor) -> None:
    # A kernel reads NP values through this pointer: anything else would read out of bounds.
    m = REGISTRY[model]
    if not (isinstance(params, Tensor) and params.shape == (len(m.params),) and params.device == x.device
            and params.dtype == state_dtype(x.dtype) and params.is_contiguous()):
        got = f"{tuple(params.shape)} {params.dtype} on {params.device}" if isinstance(params, Tensor) else repr(params)
        raise ValueError(f"params of model {model!r} must be a contiguous ({len(m.params)},) {state_dtype(x.dtype)} "
                         f"tensor on {x.device} holding {m.params}, got {got}: build it with "
                         f"functional.parameter_tensor")


def _check_fold(x: Tensor, bn_scale: Optional[Tensor], bn_shift: Optional[Tensor], inner: int,
                channels: int) -> bool:
    """True when BatchNorm is folded; raises for arguments the kernels would misread."""
    if bn_scale is None and bn_shift is None:
        return False
    acc = state_dtype(x.dtype)
    ok = all(isinstance(t, Tensor) and t.shape == (channels,) and t.dtype == acc and t.device == x.device
             and t.is_contiguous() for t in (bn_scale, bn_shift))
    n = x[0].numel() if x.dim() > 0 and x.shape[0] > 0 else 0
    if not ok or channels < 1 or inner < 1 or n % (inner * channels):
        raise ValueError(
            f"bn_scale and bn_shift must both be contiguous ({channels},) {acc} tensors on {x.device}, "
            f"with bn_channels >= 1, bn_inner >= 1 and bn_inner * bn_channels dividing the neurons per "
            f"step ({n}); got scale {None if bn_scale is None else tuple(bn_scale.shape)}, shift "
            f"{None if bn_shift is None else tuple(bn_shift.shape)}, inner {inner}, channels {channels}: "
            f"build them with functional.batch_norm_scale_shift")
    return True


def _fold_args(fold: bool, bn_scale, bn_shift, inner: int, channels: int) -> dict:
    return dict(bn_scale=bn_scale if fold else None, bn_shift=bn_shift if fold else None,
                bn_inner=inner if fold else 1, bn_channels=channels if fold else 1)


def _empty_state(x: Tensor) -> Tensor:
    return x.new_empty((0,), dtype=state_dtype(x.dtype))


def _forward_outputs(x: Tensor, model: str, store_v_seq: bool, save_checkpoints: bool):
    acc = state_dtype(x.dtype)
    num_states = REGISTRY[model].num_states
    T, n = x.shape[0], x[0].numel()
    v_last = x.new_empty(x.shape[1:], dtype=acc)
    aux_last = x.new_empty(x.shape[1:], dtype=acc) if num_states == 2 else _empty_state(x)
    v_seq = torch.empty_like(x) if store_v_seq else x.new_empty((0,))
    checkpoints = x.new_empty((num_checkpoints(T, model), num_states, n) if save_checkpoints else (0,),
                              dtype=acc)
    return torch.empty_like(x), v_last, aux_last, v_seq, checkpoints


@torch.library.custom_op("sj_temporal_fusion::neuron_forward", mutates_args=())
def neuron_forward(x: Tensor, v_init: Tensor, aux_init: Tensor, params: Tensor, model: str, form: int,
                   backward_form: int, surrogate_id: int, surrogate_a: float, surrogate_b: float,
                   param_grad_mask: int, store_v_seq: bool, save_checkpoints: bool,
                   bn_scale: Optional[Tensor] = None, bn_shift: Optional[Tensor] = None, bn_inner: int = 1,
                   bn_channels: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (T, *), v_init and aux_init (*) in the state dtype (aux_init empty for one-state models),
    params (NP,) in the state dtype -> spike (T, *), v_last, aux_last, v_seq (T, *) or empty,
    checkpoints or empty. ``backward_form``, the surrogate arguments and ``param_grad_mask`` (the
    entries of ``params`` that are learnable) are kept for the backward. ``bn_*``: BatchNorm
    folded into the read of x (module docstring); v_seq is then that of x_eff."""
    m = REGISTRY[model]
    _check_params(params, model, x)
    fold = _check_fold(x, bn_scale, bn_shift, bn_inner, bn_channels)
    spike, v_last, aux_last, v_seq, checkpoints = _forward_outputs(x, model, store_v_seq, save_checkpoints)
    _huge_pages.advise(spike, v_seq)
    two = m.num_states == 2
    launch(forward_variant(m, x.dtype, form, fold), x, dict(
        x=x, v_init=v_init, aux_init=aux_init if two else None, spike=spike, v_last=v_last,
        aux_last=aux_last if two else None, v_seq=v_seq if store_v_seq else None,
        checkpoints=checkpoints if save_checkpoints else None, params=params, T=x.shape[0], N=x[0].numel(),
        **_fold_args(fold, bn_scale, bn_shift, bn_inner, bn_channels)))
    return spike, v_last, aux_last, v_seq, checkpoints


@neuron_forward.register_fake
def _(x, v_init, aux_init, params, model, form, backward_form, surrogate_id, surrogate_a, surrogate_b,
      param_grad_mask, store_v_seq, save_checkpoints, bn_scale=None, bn_shift=None, bn_inner=1, bn_channels=1):
    return _forward_outputs(x, model, store_v_seq, save_checkpoints)


def param_grad_rows(mask: int, num_params: int) -> int:
    """Rows of the backward's parameter-gradient buffer: one per learnable entry in ``mask``
    (the kernel writes entry i's row at the count of masked entries below i)."""
    return bin(mask & ((1 << num_params) - 1)).count("1")


def _backward_outputs(x: Tensor, num_states: int, num_params: int, mask: int, want_grad_x: bool,
                      want_a: bool):
    acc = state_dtype(x.dtype)
    n = x[0].numel()
    grad_x = torch.empty_like(x) if want_grad_x else x.new_empty((0,))
    grad_v_init = x.new_empty(x.shape[1:], dtype=acc)
    grad_aux_init = x.new_empty(x.shape[1:], dtype=acc) if num_states == 2 else _empty_state(x)
    grad_params = x.new_empty((param_grad_rows(mask, num_params), n), dtype=acc) if mask else _empty_state(x)
    a_prod = x.new_empty((n,), dtype=acc) if want_a else _empty_state(x)
    return grad_x, grad_v_init, grad_aux_init, grad_params, a_prod


def spike_gradient(grad: Optional[Tensor], x: Tensor) -> Tensor:
    """dL/dspike as the backward kernels read it: (T, *) contiguous, or one step's (*) row when every
    step's gradient is the same row (stride 0 over time: autograd's expanded gradient of
    ``spike.sum()`` or ``spike.sum(0)``; ``mean()``'s arrives dense), read at every step instead of
    copied T times; None (spike unused) is a zero row."""
    if grad is None:
        return x.new_zeros(x.shape[1:])
    if grad.is_contiguous():
        return grad
    if grad.dim() == x.dim() and grad.stride(0) == 0:
        return grad[0].contiguous()
    return grad.contiguous()


def _grad_spike_step(grad_spike: Tensor, x: Tensor) -> int:
    """The backward kernel's grad_spike_step: N for a (T, *) gradient, 0 for one step's (*) row."""
    if not (grad_spike.dtype == x.dtype and grad_spike.device == x.device and grad_spike.is_contiguous()
            and grad_spike.shape in (x.shape, x.shape[1:])):
        raise ValueError(
            f"grad_spike must be a contiguous {x.dtype} tensor on {x.device} of x's shape {tuple(x.shape)} "
            f"or of one step's {tuple(x.shape[1:])} (the same gradient at every step), got "
            f"{tuple(grad_spike.shape)} {grad_spike.dtype} on {grad_spike.device}"
            f"{'' if grad_spike.is_contiguous() else ', not contiguous'}: pass ops.spike_gradient(grad, x)")
    return x[0].numel() if grad_spike.shape == x.shape else 0


@torch.library.custom_op("sj_temporal_fusion::neuron_backward", mutates_args=())
def neuron_backward(grad_spike: Tensor, grad_v_seq: Optional[Tensor], grad_v_last: Optional[Tensor],
                    grad_aux_last: Optional[Tensor], x: Tensor, checkpoints: Tensor, params: Tensor,
                    model: str, form: int, surrogate_id: int, surrogate_a: float, surrogate_b: float,
                    grad_params_mask: int, want_grad_x: bool, want_a: bool, bn_scale: Optional[Tensor] = None,
                    bn_shift: Optional[Tensor] = None, bn_inner: int = 1, bn_channels: int = 1
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``grad_spike``: (T, *), or one step's (*) row when every step's is the same (``spike_gradient``).
    -> grad_x (T, *) or empty, grad_v_init and grad_aux_init (*) in the state dtype, per-neuron
    parameter gradients (R, N), one row per entry in ``grad_params_mask`` in entry order, or empty, and
    (time sharding, one state variable) the product of the steps' carry factors (N,) or empty.
    With ``bn_*`` (folded BatchNorm) grad_x is dL/dx_eff."""
    m = REGISTRY[model]
    _check_params(params, model, x)
    fold = _check_fold(x, bn_scale, bn_shift, bn_inner, bn_channels)
    grad_spike_step = _grad_spike_step(grad_spike, x)
    param_grads = grad_params_mask != 0
    outs = _backward_outputs(x, m.num_states, len(m.params), grad_params_mask, want_grad_x, want_a)
    grad_x, grad_v_init, grad_aux_init, grad_params, a_prod = outs
    _huge_pages.advise(grad_x)
    two = m.num_states == 2
    launch(backward_variant(m, x.dtype, surrogate_id, form, param_grads, fold, shard=want_a or not want_grad_x), x, dict(
        grad_spike=grad_spike, grad_v_seq=grad_v_seq, grad_v_last=grad_v_last,
        grad_aux_last=grad_aux_last if two else None, x=x, checkpoints=checkpoints, params=params,
        grad_x=grad_x if want_grad_x else None, grad_v_init=grad_v_init,
        grad_aux_init=grad_aux_init if two else None, grad_params=grad_params if param_grads else None,
        grad_params_mask=grad_params_mask, a_prod=a_prod if want_a else None, sg_a=surrogate_a,
        sg_b=surrogate_b, T=x.shape[0], N=x[0].numel(), grad_spike_step=grad_spike_step,
        **_fold_args(fold, bn_scale, bn_shift, bn_inner, bn_channels)))
    return outs


@neuron_backward.register_fake
def _(grad_spike, grad_v_seq, grad_v_last, grad_aux_last, x, checkpoints, params, model, form, surrogate_id,
      surrogate_a, surrogate_b, grad_params_mask, want_grad_x, want_a, bn_scale=None, bn_shift=None, bn_inner=1,
      bn_channels=1):
    m = REGISTRY[model]
    return _backward_outputs(x, m.num_states, len(m.params), grad_params_mask, want_grad_x, want_a)


@torch.library.custom_op("sj_temporal_fusion::neuron_fixup",
                         mutates_args=("checkpoints", "spike", "v_seq", "v_last"))
def neuron_fixup(x: Tensor, v_true_init: Tensor, checkpoints: Tensor, spike: Tensor, v_seq: Optional[Tensor],
                 v_last: Tensor, params: Tensor, model: str, form: int) -> Tensor:
    """Time sharding: rewrites the speculative run's ``spike``, ``v_seq``, ``checkpoints`` and
    ``v_last`` (in place) into the run from ``v_true_init``. Returns the fix-up length per neuron
    (N,) int32: the first step whose pre-spike h equals the speculative one bitwise, or T."""
    m = REGISTRY[model]
    if not m.shardable:
        raise ValueError(f"model {model!r} has {m.num_states} state variables; the speculative fix-up "
                         f"needs one")
    _check_params(params, model, x)
    fixup_len = torch.empty((x[0].numel(),), dtype=torch.int32, device=x.device)
    launch(fixup_variant(m, x.dtype, form), x, dict(
        x=x, v_true_init=v_true_init, checkpoints=checkpoints, spike=spike, v_seq=v_seq, v_last=v_last,
        fixup_len=fixup_len, params=params, T=x.shape[0], N=x[0].numel()))
    return fixup_len


@neuron_fixup.register_fake
def _(x, v_true_init, checkpoints, spike, v_seq, v_last, params, model, form):
    return torch.empty((x[0].numel(),), dtype=torch.int32, device=x.device)


def summed_param_grads(grad_params: Tensor, mask: int, params: Tensor) -> Optional[Tensor]:
    """The learnable entries' gradients summed over neurons, zeros for the others (autograd routes
    each entry back to what the parameter tensor was built from), or None when ``mask`` is 0."""
    if not mask:
        return None
    entries = [i for i in range(params.shape[0]) if mask >> i & 1]  # grad_params' rows, in order
    total = params.new_zeros(params.shape)
    total[entries] = grad_params.sum(1).to(params.dtype)
    return total


def input_names(schema) -> tuple[str, ...]:
    """An op's inputs in its schema's order: autograd orders ``needs_input_grad`` and the
    gradients it expects back so."""
    return tuple(a.name for a in schema.arguments)


def needs_grad(ctx, inputs: Sequence[str]) -> dict[str, bool]:
    """``ctx.needs_input_grad`` by input name (``inputs``: the names in autograd's order)."""
    return dict(zip(inputs, ctx.needs_input_grad))


def gradients(inputs: Sequence[str], **grads) -> tuple:
    """The gradients autograd expects, one per input in ``inputs``' order, from ``grads`` by name
    (None for the inputs not named). A name that is not an input is an error, so a renamed input
    cannot lose its gradient silently."""
    unknown = sorted(set(grads) - set(inputs))
    if unknown:
        raise TypeError(f"gradients for {unknown}, which are not among the inputs {list(inputs)}: "
                        f"name them as the forward's signature does")
    return tuple(grads.get(name) for name in inputs)


_FORWARD_SCHEMA = torch.ops.sj_temporal_fusion.neuron_forward.default._schema
_FORWARD_INPUTS = input_names(_FORWARD_SCHEMA)
# Inputs a caller may leave out; setup_context may then see them missing.
_FORWARD_DEFAULTS = {a.name: a.default_value for a in _FORWARD_SCHEMA.arguments if a.has_default_value()}


def _setup_context(ctx, inputs, output):
    args = {**_FORWARD_DEFAULTS, **dict(zip(_FORWARD_INPUTS, inputs))}
    x, params, mask = args["x"], args["params"], args["param_grad_mask"]
    bn_scale, bn_shift, bn_inner, bn_channels = (args[k] for k in ("bn_scale", "bn_shift", "bn_inner", "bn_channels"))
    ctx.options = (args["model"], args["backward_form"], args["surrogate_id"], args["surrogate_a"],
                   args["surrogate_b"], mask)
    ctx.fold = (bn_inner, bn_channels) if bn_scale is not None else None
    _spike, _v_last, _aux_last, _v_seq, checkpoints = output
    # Folded: x is the BatchNorm's input, the only activation kept (x_eff is recomputed).
    ctx.save_for_backward(x, checkpoints, params, bn_scale, bn_shift)
    ctx.mark_non_differentiable(checkpoints)
    # An unused output (v_seq, the final state) then arrives as None, not as zeros the backward reads.
    ctx.set_materialize_grads(False)


def _present(grad: Optional[Tensor]) -> Optional[Tensor]:
    return None if grad is None or grad.numel() == 0 else grad.contiguous()


def _backward(ctx, grad_spike, grad_v_last, grad_aux_last, grad_v_seq, _grad_checkpoints):
    x, checkpoints, params, bn_scale, bn_shift = ctx.saved_tensors
    model, form, surrogate_id, surrogate_a, surrogate_b, mask = ctx.options
    fold = {} if ctx.fold is None else dict(zip(("bn_scale", "bn_shift", "bn_inner", "bn_channels"),
                                                (bn_scale, bn_shift) + ctx.fold))
    if checkpoints.numel() == 0:
        raise RuntimeError(
            "sj_temporal_fusion::neuron_forward ran with save_checkpoints=False, so it cannot be "
            "differentiated; call functional.neuron_multi_step, which saves them when grad is needed")
    needs = needs_grad(ctx, _FORWARD_INPUTS)
    mask = mask if needs["params"] else 0
    grad_x, grad_v_init, grad_aux_init, grad_params, _ = neuron_backward(
        grad_spike=spike_gradient(grad_spike, x), grad_v_seq=_present(grad_v_seq), grad_v_last=_present(grad_v_last),
        grad_aux_last=_present(grad_aux_last), x=x, checkpoints=checkpoints, params=params, model=model, form=form,
        surrogate_id=surrogate_id, surrogate_a=surrogate_a, surrogate_b=surrogate_b, grad_params_mask=mask,
        want_grad_x=True, want_a=False, **fold)
    grad_aux = grad_aux_init if grad_aux_init.numel() else None
    grad_scale = grad_shift = None
    if fold:
        grad_x, grad_scale, grad_shift = _affine_backward(grad_x, x, bn_scale, *ctx.fold,
                                                          (needs.get("bn_scale"), needs.get("bn_shift")))
    return gradients(_FORWARD_INPUTS, x=grad_x, v_init=grad_v_init, aux_init=grad_aux,
                     params=summed_param_grads(grad_params, mask, params), bn_scale=grad_scale,
                     bn_shift=grad_shift)


def _affine_backward(grad_y: Tensor, x: Tensor, scale: Tensor, inner: int, channels: int, needs) -> tuple:
    """dL/dy of y = x * scale[c] + shift[c] -> dL/dx, dL/dscale = sum(dL/dy * x), dL/dshift =
    sum(dL/dy) (per channel, state dtype). One fused pass and one new (T, *) tensor: PyTorch's
    BatchNorm backward in eval mode with mean 0, variance 1, eps 0 and weight ``scale`` computes
    exactly these (a torch expression would allocate a product tensor per sum)."""
    shape = (grad_y.shape[0] * grad_y[0].numel() // (channels * inner), channels, inner)
    if x.dtype == scale.dtype:
        zeros, ones = scale.new_zeros(channels), scale.new_ones(channels)
        # save_mean / save_invstd given as that same mean 0 and 1 / sqrt(1 + 0): CUDA's backward
        # asserts them defined outside its fused path (eval with no weight or bias gradient, or
        # tensors past 32-bit indexing); the CPU's eval path reads the running statistics instead.
        grad_x, grad_scale, grad_shift = torch.ops.aten.native_batch_norm_backward(
            grad_y.reshape(shape), x.reshape(shape), scale, zeros, ones, zeros, ones, False, 0.0,
            [True, bool(needs[0]), bool(needs[1])])
        return grad_x.view(x.shape), grad_scale, grad_shift
    g = grad_y.reshape(shape).to(scale.dtype)  # fp16 / bf16: sums in the state dtype
    grad_x = (g * scale.view(1, -1, 1)).to(x.dtype).view(x.shape)
    grad_scale = (g * x.reshape(shape).to(scale.dtype)).sum((0, 2)) if needs[0] else None
    grad_shift = g.sum((0, 2)) if needs[1] else None
    return grad_x, grad_scale, grad_shift


torch.library.register_autograd("sj_temporal_fusion::neuron_forward", _backward, setup_context=_setup_context)
