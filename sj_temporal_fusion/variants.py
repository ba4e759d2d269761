"""Kernel variant names: one C++ name expression per (kernel, model, dtype, FORM[, surrogate,
parameter gradients][, BatchNorm folded]). NVRTC compiles it (``_cuda``) and so does g++ (``_host``), each when first used."""
from __future__ import annotations

import torch

from .neurons.base import NeuronModel

CUDA_TYPES = {torch.float32: "float", torch.float64: "double", torch.float16: "f16_t", torch.bfloat16: "bf16_t"}


def _fold(fold_bn: bool) -> str:
    # FOLD (BatchNorm folded into the read of x) defaults to false in the templates, so the
    # unfolded variants keep their names.
    return ", true" if fold_bn else ""


def forward_variant(model: NeuronModel, dtype: torch.dtype, form: int, fold_bn: bool = False) -> str:
    return f"neuron_forward<{model.struct}, {CUDA_TYPES[dtype]}, {form}{_fold(fold_bn)}>"


def backward_variant(model: NeuronModel, dtype: torch.dtype, surrogate_id: int, form: int, param_grads: bool,
                     fold_bn: bool = False, shard: bool = False) -> str:
    """``shard``: the time-sharded node's variant (grad_x optional, the carry factor)."""
    tail = (f", {'true' if fold_bn else 'false'}, true" if shard else _fold(fold_bn))
    return (f"neuron_backward<{model.struct}, {CUDA_TYPES[dtype]}, {surrogate_id}, {form}, "
            f"{'true' if param_grads else 'false'}{tail}>")


def fixup_variant(model: NeuronModel, dtype: torch.dtype, form: int) -> str:
    return f"neuron_fixup<{model.struct}, {CUDA_TYPES[dtype]}, {form}>"
