"""The surrogate table: each surrogate gradient the kernels know, one entry each, and the mapping
from SpikingJelly surrogate objects to the kernel's (integer id, two float parameters).

An entry names its id and name (``SG_<NAME>`` in csrc/surrogate.cuh, whose switch holds the
kernels' derivative; tests/test_reference.py checks the two against each other), SpikingJelly's
class name, the object's attributes passed as the kernel's ``(a, b)``, and the reference
derivative in PyTorch that the oracle (``sj_temporal_fusion.reference``) uses, written out from
SpikingJelly 0.0.0.0.14's documentation apart from both its code and the kernels.

The table holds all 14 surrogate classes of SpikingJelly 0.0.0.0.14's activation_based API (its
cupy backend supports 8 of them). The 11 classes of its clock_driven API that carry the same names
have the same derivatives and parameter attributes, so each maps to its namesake's entry (its
cupy backend supports 5 of them).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from spikingjelly.activation_based import surrogate as sj_surrogate
from . import versions

cd_surrogate = versions.clock_driven("surrogate")  # a stand-in matching nothing under SpikingJelly 2.x


class Surrogate(NamedTuple):
    id: int                          # SG_<NAME> in csrc/surrogate.cuh
    name: str                        # that NAME, lower-case
    cls: str                         # SpikingJelly's class name (the same in both APIs)
    params: tuple[str, Optional[str]]  # the object's attributes passed as (a, b); None: unused
    derivative: Callable             # (x, a, b) -> g'(x), x = h - v_threshold, in PyTorch


def _sigmoid_grad(x, a):
    s = torch.sigmoid(a * x)
    return a * s * (1 - s)


def _squarewave_fourier_series(x, n, period):
    w = 2 * math.pi / period
    return sum((torch.cos((2 * i - 1) * w * x) for i in range(1, int(n))), torch.zeros_like(x)) * (4 / period)


SURROGATES = (
    Surrogate(0, "piecewise_quadratic", "PiecewiseQuadratic", ("alpha", None),
              lambda x, a, b: torch.where(x.abs() > 1 / a, torch.zeros_like(x), -(a * a) * x.abs() + a)),
    Surrogate(1, "piecewise_exp", "PiecewiseExp", ("alpha", None),
              lambda x, a, b: a / 2 * torch.exp(-a * x.abs())),
    Surrogate(2, "sigmoid", "Sigmoid", ("alpha", None),
              lambda x, a, b: _sigmoid_grad(x, a)),
    Surrogate(3, "soft_sign", "SoftSign", ("alpha", None),
              lambda x, a, b: 1 / (2 * a * (1 / a + x.abs()) ** 2)),
    Surrogate(4, "atan", "ATan", ("alpha", None),
              lambda x, a, b: a / 2 / (1 + (math.pi / 2 * a * x) ** 2)),
    Surrogate(5, "nonzero_sign_log_abs", "NonzeroSignLogAbs", ("alpha", None),
              lambda x, a, b: 1 / (1 / a + x.abs())),
    Surrogate(6, "erf", "Erf", ("alpha", None),
              lambda x, a, b: torch.exp(-(a * x) ** 2) * a / math.sqrt(math.pi)),
    Surrogate(7, "piecewise_leaky_relu", "PiecewiseLeakyReLU", ("w", "c"),
              lambda x, a, b: torch.where(x.abs() < a, torch.ones_like(x) / a, torch.ones_like(x) * b)),
    Surrogate(8, "squarewave_fourier_series", "SquarewaveFourierSeries", ("n", "T_period"),
              _squarewave_fourier_series),
    Surrogate(9, "s2nn", "S2NN", ("alpha", "beta"),
              lambda x, a, b: torch.where(x < 0, _sigmoid_grad(x, a), b / (x + 1))),
    Surrogate(10, "q_pseudo_spike", "QPseudoSpike", ("alpha", None),
              lambda x, a, b: (1 + 2 / (a - 1) * x.abs()) ** (-a)),
    Surrogate(11, "leaky_k_relu", "LeakyKReLU", ("leak", "k"),
              lambda x, a, b: torch.where(x >= 0, torch.ones_like(x) * b, torch.ones_like(x) * a)),
    Surrogate(12, "fake_numerical_gradient", "FakeNumericalGradient", ("alpha", None),
              lambda x, a, b: torch.clamp_max(torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x)) / x, a)),
    Surrogate(13, "log_tailed_relu", "LogTailedReLU", ("alpha", None),
              lambda x, a, b: torch.where(x > 1, 1 / x, torch.where(x <= 0, torch.ones_like(x) * a,
                                                                     torch.ones_like(x)))),
)

# SpikingJelly class (either API) -> id
NAMES = {getattr(sj_surrogate, s.cls): s.id for s in SURROGATES}
CLOCK_DRIVEN = {getattr(cd_surrogate, s.cls): s.id for s in SURROGATES if hasattr(cd_surrogate, s.cls)}
NAMES.update(CLOCK_DRIVEN)
DEFAULT_ID = NAMES[sj_surrogate.Sigmoid]  # SpikingJelly's default surrogate


class SurrogateSpec(NamedTuple):
    id: int
    a: float
    b: float


def spec(surrogate_function) -> SurrogateSpec:
    """The kernel's view of ``surrogate_function`` (a SpikingJelly surrogate instance of either API)."""
    if surrogate_function is None:
        surrogate_function = sj_surrogate.Sigmoid()
    cls = type(surrogate_function)
    if cls not in NAMES:
        clock = {c.__name__ for c in CLOCK_DRIVEN}
        supported = ", ".join(f"{s.cls} (activation_based{', clock_driven' if s.cls in clock else ''})"
                              for s in SURROGATES)
        raise NotImplementedError(
            f"backend 'temporal_fusion' does not know the surrogate {cls.__module__}.{cls.__qualname__}: "
            f"its derivative must be compiled into the kernel. Supported: {supported}. "
            f"Use one of them, or backend='torch' for a custom surrogate.")
    if not getattr(surrogate_function, "spiking", True):
        raise NotImplementedError(
            f"{cls.__name__}(spiking=False) outputs the primitive function, not spikes; backend "
            f"'temporal_fusion' fuses spiking neurons only. Use spiking=True or backend='torch'.")
    sg_id = NAMES[cls]
    a_name, b_name = SURROGATES[sg_id].params
    a = float(getattr(surrogate_function, a_name))
    b = float(getattr(surrogate_function, b_name)) if b_name else 0.0
    return SurrogateSpec(sg_id, a, b)
