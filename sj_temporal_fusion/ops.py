"""torch.library custom ops over the fused kernels, with fake (meta) implementations and
registered autograd; they run the GPU build for CUDA tensors and the host build otherwise.

Layer names: ``sj_temporal_fusion::lif_forward`` / ``lif_backward`` (here) ->
``functional.lif_multi_step`` -> the SpikingJelly neuron hook (``spikingjelly.py``).
Signatures carry plain values only: the neuron kind and the surrogate are integers.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Optional

import torch
from torch import Tensor

from . import _cuda, _host

CHUNK = 16  # LIF_CHUNK in csrc/lif.cu: a checkpoint of v every 16 steps


class Kind(IntEnum):
    IF = 0
    LIF = 1
    PLIF = 2


DECAY_INPUT, HARD_RESET, DETACH_RESET = 1, 2, 4
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the membrane state inside the kernels: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_checkpoints(T: int) -> int:
    return (T + CHUNK - 1) // CHUNK


def _flags(decay_input: bool, hard_reset: bool, detach_reset: bool) -> int:
    return (DECAY_INPUT if decay_input else 0) | (HARD_RESET if hard_reset else 0) | (
        DETACH_RESET if detach_reset else 0)


def _launch(kernel: str, x: Tensor, surrogate_id: Optional[int], args) -> None:
    """The one place a kernel is launched: GPU build for CUDA tensors, host build otherwise."""
    if x.is_cuda:
        expression = _cuda.name_expression(kernel, x.dtype, surrogate_id)
        _cuda.launch(expression, x.device, x.shape[1], args, x.dtype == torch.float64)
    else:
        _host.launch("tf_" + kernel, x.dtype, surrogate_id, args)


@torch.library.custom_op("sj_temporal_fusion::lif_forward", mutates_args=())
def lif_forward(x: Tensor, v_init: Tensor, k_tensor: Optional[Tensor], tau: float, keep: float,
                v_threshold: float, v_reset: float, kind: int, decay_input: bool, hard_reset: bool,
                detach_reset: bool, surrogate_id: int, surrogate_a: float, surrogate_b: float,
                store_v_seq: bool, save_checkpoints: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (T, N), v_init (N,) -> spike (T, N), v_last (N,), v_seq (T, N) or (0, N), checkpoints
    (ceil(T/16), N) in the state dtype or (0, N). ``k_tensor`` (2,) is PLIF's (sigmoid(w),
    1 - sigmoid(w)), read on the device; ``keep`` is LIF's 1 - 1/tau. The surrogate arguments
    are kept for the backward."""
    T, N = x.shape
    spike = torch.empty_like(x)
    v_last = torch.empty_like(v_init)
    v_seq = torch.empty_like(x) if store_v_seq else x.new_empty((0, N))
    checkpoints = x.new_empty((num_checkpoints(T) if save_checkpoints else 0, N), dtype=state_dtype(x.dtype))
    _launch("lif_forward", x, None, [
        ("ptr", x), ("ptr", v_init), ("ptr", spike), ("ptr", v_last),
        ("ptr", v_seq if store_v_seq else None), ("ptr", checkpoints if save_checkpoints else None),
        ("ptr", k_tensor), ("acc", tau), ("acc", keep), ("acc", v_threshold), ("acc", v_reset),
        ("int", kind), ("int", _flags(decay_input, hard_reset, detach_reset)), ("int", T), ("ll", N)])
    return spike, v_last, v_seq, checkpoints


@lif_forward.register_fake
def _(x, v_init, k_tensor, tau, keep, v_threshold, v_reset, kind, decay_input, hard_reset, detach_reset,
      surrogate_id, surrogate_a, surrogate_b, store_v_seq, save_checkpoints):
    T, N = x.shape
    v_seq = torch.empty_like(x) if store_v_seq else x.new_empty((0, N))
    checkpoints = x.new_empty((num_checkpoints(T) if save_checkpoints else 0, N), dtype=state_dtype(x.dtype))
    return torch.empty_like(x), torch.empty_like(v_init), v_seq, checkpoints


@torch.library.custom_op("sj_temporal_fusion::lif_backward", mutates_args=())
def lif_backward(grad_spike: Tensor, grad_v_seq: Optional[Tensor], grad_v_last: Optional[Tensor],
                 x: Tensor, checkpoints: Tensor, k_tensor: Optional[Tensor], tau: float, keep: float,
                 v_threshold: float, v_reset: float, kind: int, decay_input: bool, hard_reset: bool,
                 detach_reset: bool, surrogate_id: int, surrogate_a: float, surrogate_b: float,
                 want_grad_k: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> grad_x (T, N), grad_v_init (N,), per-neuron dL/dk (N,) in the state dtype (or (0,))."""
    T, N = x.shape
    grad_x = torch.empty_like(x)
    grad_v_init = x.new_empty((N,))
    grad_k = x.new_empty((N if want_grad_k else 0,), dtype=state_dtype(x.dtype))
    _launch("lif_backward", x, surrogate_id, [
        ("ptr", grad_spike), ("ptr", grad_v_seq), ("ptr", grad_v_last), ("ptr", x), ("ptr", checkpoints),
        ("ptr", k_tensor), ("ptr", grad_x), ("ptr", grad_v_init), ("ptr", grad_k if want_grad_k else None),
        ("acc", tau), ("acc", keep), ("acc", v_threshold), ("acc", v_reset), ("acc", surrogate_a),
        ("acc", surrogate_b), ("int", kind), ("int", _flags(decay_input, hard_reset, detach_reset)),
        ("int", T), ("ll", N)])
    return grad_x, grad_v_init, grad_k


@lif_backward.register_fake
def _(grad_spike, grad_v_seq, grad_v_last, x, checkpoints, k_tensor, tau, keep, v_threshold, v_reset, kind,
      decay_input, hard_reset, detach_reset, surrogate_id, surrogate_a, surrogate_b, want_grad_k):
    T, N = x.shape
    grad_k = x.new_empty((N if want_grad_k else 0,), dtype=state_dtype(x.dtype))
    return torch.empty_like(x), x.new_empty((N,)), grad_k


def _setup_context(ctx, inputs, output):
    x, _, k_tensor, *options = inputs
    ctx.options = tuple(options[:-2])  # tau ... surrogate_b; drops store_v_seq, save_checkpoints
    ctx.save_for_backward(x, output[3], k_tensor)
    ctx.mark_non_differentiable(output[3])
    # An unused output (v_seq, v_last) then arrives as None, not as zeros the backward would read.
    ctx.set_materialize_grads(False)


def _present(grad: Optional[Tensor]) -> Optional[Tensor]:
    return None if grad is None or grad.numel() == 0 else grad.contiguous()


def _backward(ctx, grad_spike, grad_v_last, grad_v_seq, _grad_checkpoints):
    x, checkpoints, k_tensor = ctx.saved_tensors
    if checkpoints.shape[0] == 0:
        raise RuntimeError(
            "sj_temporal_fusion::lif_forward ran with save_checkpoints=False, so it cannot be "
            "differentiated; call functional.lif_multi_step, which saves them when grad is needed")
    if grad_spike is None:
        grad_spike = torch.zeros_like(x)
    want_grad_k = k_tensor is not None and ctx.needs_input_grad[2]
    grad_x, grad_v_init, grad_k = lif_backward(
        grad_spike.contiguous(), _present(grad_v_seq), _present(grad_v_last), x, checkpoints, k_tensor,
        *ctx.options, want_grad_k)
    # The kernel's dL/dk treats 1 - k as a function of k, so the second entry gets no gradient.
    grad_k_total = torch.stack([grad_k.sum(), grad_k.new_zeros(())]).to(k_tensor.dtype) if want_grad_k else None
    return (grad_x, grad_v_init, grad_k_total) + (None,) * 13


torch.library.register_autograd("sj_temporal_fusion::lif_forward", _backward, setup_context=_setup_context)
