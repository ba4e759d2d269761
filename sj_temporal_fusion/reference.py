"""Pure-PyTorch neurons: the test oracle. Step by step, autograd through every
op, in whatever dtype it is given (fp64 for an oracle). The charge formulas are SpikingJelly
0.0.0.0.14's; the surrogate derivatives are the surrogate table's (``surrogate.SURROGATES``), written
out from its documentation apart from both SpikingJelly's code and the kernels."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import surrogate as surrogate_specs
from .neurons import REGISTRY


def surrogate_grad(sg_id: int, x: Tensor, a: float, b: float) -> Tensor:
    """g'(x) of surrogate ``sg_id``: the reference derivative of its entry in ``surrogate.SURROGATES``."""
    if not 0 <= sg_id < len(surrogate_specs.SURROGATES):
        raise ValueError(f"sg_id={sg_id} is no surrogate id: ids are 0 to {len(surrogate_specs.SURROGATES) - 1} "
                         f"(sj_temporal_fusion.surrogate.SURROGATES); get one from surrogate.spec(...)")
    return surrogate_specs.SURROGATES[sg_id].derivative(x, a, b)


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sg_id, a, b):
        ctx.save_for_backward(x)
        ctx.sg = (sg_id, a, b)
        return (x >= 0).to(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * surrogate_grad(*ctx.sg[:1], x, *ctx.sg[1:]), None, None, None


def neuron_reference(x_seq: Tensor, state=None, *, model: str = "lif", surrogate_function=None,
                     store_v_seq: bool = False, **options) -> tuple[Tensor, tuple, Optional[Tensor]]:
    """Same contract as ``functional.neuron_multi_step``, computed step by step in x_seq's dtype
    from the model's reference charge and reset (``neurons/<name>.py``)."""
    m = REGISTRY[model]
    o = dict(m.defaults, **options)
    sg = surrogate_specs.spec(surrogate_function)
    init = m.initial_state(o)
    z = tuple(x_seq.new_full(x_seq.shape[1:], init[k]) if state is None or state[k] is None
              else state[k].to(x_seq) for k in range(m.num_states))
    spikes, vs = [], []
    for x in x_seq:
        h = m.charge(z, x, o)
        s = _Spike.apply(h - o["v_threshold"], sg.id, sg.a, sg.b)
        z = m.reset(z, h, s, s.detach() if o["detach_reset"] else s, o)
        spikes.append(s)
        vs.append(z[0])
    return torch.stack(spikes), z, torch.stack(vs) if store_v_seq else None


def lif_reference(x_seq: Tensor, v_init: Optional[Tensor] = None, *, kind: str = "lif",
                  tau: float = 2.0, w: Optional[Tensor] = None, decay_input: bool = True,
                  v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                  detach_reset: bool = False, surrogate_function=None,
                  store_v_seq: bool = False) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Same contract as ``functional.lif_multi_step`` (v_last in x_seq's dtype here)."""
    spikes, (v,), vs = neuron_reference(
        x_seq, None if v_init is None else (v_init,), model="lif", kind=kind, tau=tau, w=w,
        decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset, detach_reset=detach_reset,
        surrogate_function=surrogate_function, store_v_seq=store_v_seq)
    return spikes, v, vs
