"""SpikingJelly surrogate objects -> (integer id, two float parameters) for the kernels.

The ids follow ``SG_*`` in csrc/surrogate.cuh; ``SURROGATES`` lists all 14 surrogate classes of
SpikingJelly 0.0.0.0.14's activation_based API (its cupy backend supports 8 of them). The 11 classes
of its clock_driven API that carry the same names have the same derivatives and parameter
attributes, so each maps to the id of its namesake (its cupy backend supports 5 of them).
"""
from __future__ import annotations

from typing import NamedTuple

from spikingjelly.activation_based import surrogate as sj_surrogate
from spikingjelly.clock_driven import surrogate as cd_surrogate


class SurrogateSpec(NamedTuple):
    id: int
    a: float
    b: float


# (class, C enum name, parameters read from the object as (a, b)).
SURROGATES = (
    (sj_surrogate.PiecewiseQuadratic, "SG_PIECEWISE_QUADRATIC", ("alpha", None)),
    (sj_surrogate.PiecewiseExp, "SG_PIECEWISE_EXP", ("alpha", None)),
    (sj_surrogate.Sigmoid, "SG_SIGMOID", ("alpha", None)),
    (sj_surrogate.SoftSign, "SG_SOFT_SIGN", ("alpha", None)),
    (sj_surrogate.ATan, "SG_ATAN", ("alpha", None)),
    (sj_surrogate.NonzeroSignLogAbs, "SG_NONZERO_SIGN_LOG_ABS", ("alpha", None)),
    (sj_surrogate.Erf, "SG_ERF", ("alpha", None)),
    (sj_surrogate.PiecewiseLeakyReLU, "SG_PIECEWISE_LEAKY_RELU", ("w", "c")),
    (sj_surrogate.SquarewaveFourierSeries, "SG_SQUAREWAVE_FOURIER_SERIES", ("n", "T_period")),
    (sj_surrogate.S2NN, "SG_S2NN", ("alpha", "beta")),
    (sj_surrogate.QPseudoSpike, "SG_Q_PSEUDO_SPIKE", ("alpha", None)),
    (sj_surrogate.LeakyKReLU, "SG_LEAKY_K_RELU", ("leak", "k")),
    (sj_surrogate.FakeNumericalGradient, "SG_FAKE_NUMERICAL_GRADIENT", ("alpha", None)),
    (sj_surrogate.LogTailedReLU, "SG_LOG_TAILED_RELU", ("alpha", None)),
)
NAMES = {cls: i for i, (cls, _, _) in enumerate(SURROGATES)}
CLOCK_DRIVEN = {getattr(cd_surrogate, cls.__name__): i for i, (cls, _, _) in enumerate(SURROGATES)
                if hasattr(cd_surrogate, cls.__name__)}
NAMES.update(CLOCK_DRIVEN)
DEFAULT_ID = NAMES[sj_surrogate.Sigmoid]  # SpikingJelly's default surrogate


def spec(surrogate_function) -> SurrogateSpec:
    """The kernel's view of ``surrogate_function`` (a SpikingJelly surrogate instance of either API)."""
    if surrogate_function is None:
        surrogate_function = sj_surrogate.Sigmoid()
    cls = type(surrogate_function)
    if cls not in NAMES:
        clock = {c.__name__ for c in CLOCK_DRIVEN}
        supported = ", ".join(f"{c.__name__} (activation_based{', clock_driven' if c.__name__ in clock else ''})"
                              for c, _, _ in SURROGATES)
        raise NotImplementedError(
            f"backend 'temporal_fusion' does not know the surrogate {cls.__module__}.{cls.__qualname__}: "
            f"its derivative must be compiled into the kernel. Supported: {supported}. "
            f"Use one of them, or backend='torch' for a custom surrogate.")
    if not getattr(surrogate_function, "spiking", True):
        raise NotImplementedError(
            f"{cls.__name__}(spiking=False) outputs the primitive function, not spikes; backend "
            f"'temporal_fusion' fuses spiking neurons only. Use spiking=True or backend='torch'.")
    sg_id = NAMES[cls]
    a_name, b_name = SURROGATES[sg_id][2]
    a = float(getattr(surrogate_function, a_name))
    b = float(getattr(surrogate_function, b_name)) if b_name else 0.0
    return SurrogateSpec(sg_id, a, b)
