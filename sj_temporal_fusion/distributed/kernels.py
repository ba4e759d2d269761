"""The time-sharding kernels, launched through the custom ops ``sj_temporal_fusion::neuron_forward``
/ ``neuron_fixup`` / ``neuron_backward`` (GPU build for CUDA tensors, host build otherwise), plus
``NeuronSpec``: a SpikingJelly node's options as the plain values the ops take. Layouts: sequences
(T, N), states (N,) in the state dtype (``ops.state_dtype``: fp32 for fp16/bf16/fp32, fp64 for fp64).
Models with one state variable shard; the others are refused by name (``NeuronSpec.from_options``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import ops, surrogate as surrogate_specs
from ..functional import parameter_tensor
from ..neurons import REGISTRY


@dataclass(frozen=True)
class NeuronSpec:
    """Plain kernel arguments of one neuron layer (its parameter tensor is built per call:
    learnable parameters change)."""
    model: str
    form: int               # the forward's FORM
    backward_form: int
    surrogate_id: int
    surrogate_a: float
    surrogate_b: float
    v_reset: float          # the initial v (v_reset, or 0 for soft reset): a rank's speculative guess

    @staticmethod
    def from_options(model: str, surrogate_function=None, **options) -> "NeuronSpec":
        """From ``spikingjelly.node_options(node)`` (``neuron_multi_step``'s keyword arguments,
        ``model`` included: a registry name, as ``REGISTRY`` lists them)."""
        m = REGISTRY[model]
        if not m.shardable:
            raise ValueError(
                f"the time-sharded node cannot split model {model!r} ({', '.join(c.__name__ for c in m.classes)}): "
                f"it has {m.num_states} state variables {m.states}, and the speculative fix-up and the "
                f"backward scan are exact for one. Run this layer unsharded.")
        o = dict(m.defaults, **options)
        m.validate(o)
        sg = surrogate_specs.spec(surrogate_function)
        return NeuronSpec(m.name, m.forward_form(o), m.form(o), sg.id, sg.a, sg.b, m.initial_state(o)[0])


def neuron_parameters(options: dict, x: Tensor) -> tuple[Tensor, int]:
    """The parameter tensor for ``options`` (node_options) in x's state dtype, and the mask of its
    learnable entries: the same values functional.neuron_multi_step passes, so a sharded layer
    equals the one-device run bit for bit."""
    if "model" not in options:
        raise ValueError(f"neuron_parameters: options has no 'model' (keys {sorted(options)}): pass "
                         f"spikingjelly.node_options(node), which names it, or add model=<a REGISTRY name>")
    m = REGISTRY[options["model"]]
    o = dict(m.defaults, **{k: v for k, v in options.items() if k not in ("model", "surrogate_function")})
    return parameter_tensor(m.param_values(o), ops.state_dtype(x.dtype), x.device)


def shard_forward(x: Tensor, v_init: Tensor, spec: NeuronSpec, params: Tensor, store_v_seq: bool,
                  save_checkpoints: bool):
    """x (T, N), v_init (N,) state dtype -> spike (T, N), v_last (N,) state dtype, v_seq (T, N) or
    None, checkpoints (ceil(T / chunk), 1, N) state dtype or None
    (``chunk``: the model's checkpoint interval, ``REGISTRY[spec.model].chunk``)."""
    spike, v_last, _, v_seq, checkpoints = ops.neuron_forward(
        x=x, v_init=v_init, aux_init=v_init.new_empty((0,)), params=params, model=spec.model, form=spec.form,
        backward_form=spec.backward_form, surrogate_id=spec.surrogate_id, surrogate_a=spec.surrogate_a,
        surrogate_b=spec.surrogate_b, param_grad_mask=0, store_v_seq=store_v_seq,
        save_checkpoints=save_checkpoints)
    return spike, v_last, v_seq if store_v_seq else None, checkpoints if save_checkpoints else None


def shard_fixup(x: Tensor, v_true: Tensor, checkpoints: Tensor, spike: Tensor, v_seq: Optional[Tensor],
                v_last: Tensor, spec: NeuronSpec, params: Tensor) -> Tensor:
    """Rewrites ``spike``, ``v_seq``, ``checkpoints`` and ``v_last`` (the speculative run's, in
    place) into the run from ``v_true`` (N,). Returns the fix-up length per neuron (N,) int32:
    the first step whose pre-spike h equals the speculative one bitwise, or T if none does."""
    return ops.neuron_fixup(x=x, v_true_init=v_true, checkpoints=checkpoints, spike=spike, v_seq=v_seq,
                            v_last=v_last, params=params, model=spec.model, form=spec.form)


def shard_backward(grad_spike: Optional[Tensor], grad_v_seq: Optional[Tensor], grad_v_last: Optional[Tensor],
                   carry_in: Optional[Tensor], x: Tensor, checkpoints: Tensor, spec: NeuronSpec,
                   params: Tensor, want_grad_x: bool, want_a: bool, param_grad_mask: int = 0):
    """``grad_spike`` as autograd hands it (any layout, None when spike is unused: ops.spike_gradient).
    -> grad_x (T, N) or None, grad_v_init (N,) state dtype, A (N,) state dtype or None, the
    parameter gradients (NP,) summed over neurons (learnable entries, ``param_grad_mask``) or None.
    The carry entering the slice's last step is grad_v_last + carry_in, and
    grad_v_init = A * carry_in + (grad_v_init at carry_in = 0)."""
    acc = ops.state_dtype(x.dtype)
    carry = None
    for part in (grad_v_last, carry_in):
        if part is not None:
            carry = part.to(acc) if carry is None else carry + part.to(acc)
    grad_x, grad_v_init, _, grad_params, a_prod = ops.neuron_backward(
        grad_spike=ops.spike_gradient(grad_spike, x), grad_v_seq=grad_v_seq,
        grad_v_last=None if carry is None else carry.contiguous(), grad_aux_last=None, x=x, checkpoints=checkpoints,
        params=params, model=spec.model, form=spec.backward_form, surrogate_id=spec.surrogate_id,
        surrogate_a=spec.surrogate_a, surrogate_b=spec.surrogate_b, grad_params_mask=param_grad_mask,
        want_grad_x=want_grad_x, want_a=want_a)
    return ((grad_x if want_grad_x else None), grad_v_init, (a_prod if want_a else None),
            ops.summed_param_grads(grad_params, param_grad_mask, params))
