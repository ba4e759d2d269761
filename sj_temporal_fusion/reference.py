"""Pure-PyTorch neurons: the test oracle. Step by step, autograd through every
op, in whatever dtype it is given (fp64 for an oracle). The charge formulas are SpikingJelly
0.0.0.0.14's; the surrogate derivatives are written out here from its documentation, apart from
both SpikingJelly's code and the kernels."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import surrogate as surrogate_specs
from .neurons import REGISTRY


def surrogate_grad(sg_id: int, x: Tensor, a: float, b: float) -> Tensor:
    """g'(x) of surrogate ``sg_id`` (ids of ``surrogate.SURROGATES``)."""
    ax = x.abs()
    one = torch.ones_like(x)
    if sg_id == 0:  # PiecewiseQuadratic
        return torch.where(ax > 1 / a, torch.zeros_like(x), -(a * a) * ax + a)
    if sg_id == 1:  # PiecewiseExp
        return a / 2 * torch.exp(-a * ax)
    if sg_id == 2:  # Sigmoid
        s = torch.sigmoid(a * x)
        return a * s * (1 - s)
    if sg_id == 3:  # SoftSign
        return 1 / (2 * a * (1 / a + ax) ** 2)
    if sg_id == 4:  # ATan
        return a / 2 / (1 + (math.pi / 2 * a * x) ** 2)
    if sg_id == 5:  # NonzeroSignLogAbs
        return 1 / (1 / a + ax)
    if sg_id == 6:  # Erf
        return torch.exp(-(a * x) ** 2) * a / math.sqrt(math.pi)
    if sg_id == 7:  # PiecewiseLeakyReLU(w=a, c=b)
        return torch.where(ax < a, one / a, one * b)
    if sg_id == 8:  # SquarewaveFourierSeries(n=a, T_period=b)
        w = 2 * math.pi / b
        g = torch.zeros_like(x)
        for i in range(1, int(a)):
            g = g + torch.cos((2 * i - 1) * w * x)
        return g * (4 / b)
    if sg_id == 9:  # S2NN(alpha=a, beta=b)
        s = torch.sigmoid(a * x)
        return torch.where(x < 0, a * s * (1 - s), b / (x + 1))
    if sg_id == 10:  # QPseudoSpike
        return (1 + 2 / (a - 1) * ax) ** (-a)
    if sg_id == 11:  # LeakyKReLU(leak=a, k=b)
        return torch.where(x >= 0, one * b, one * a)
    if sg_id == 12:  # FakeNumericalGradient
        return torch.clamp_max(torch.where(x >= 0, one, -one) / x, a)
    if sg_id == 13:  # LogTailedReLU
        return torch.where(x > 1, 1 / x, torch.where(x <= 0, one * a, one))
    raise ValueError(f"unknown surrogate id {sg_id}")


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
