"""Shared test helpers: the parameter grid (a pairwise covering design plus full products of the
factors that interact most), the comparison rules, and the Spiking-ResNet18 the tests share."""
from __future__ import annotations

import zlib

import torch
from allpairspy import AllPairs
from spikingjelly.activation_based import functional, neuron, surrogate as S
from spikingjelly.activation_based.model import spiking_resnet

# A constructor per entry of the surrogate table (sj_temporal_fusion.surrogate.SURROGATES, every
# SpikingJelly 0.0.0.0.14 surrogate), with non-default parameters so a parameter that is dropped
# or swapped on the way to the kernel changes the gradient (tests/test_reference.py checks both).
SURROGATES = {
    "PiecewiseQuadratic": lambda: S.PiecewiseQuadratic(alpha=1.5),
    "PiecewiseExp": lambda: S.PiecewiseExp(alpha=2.5),
    "Sigmoid": lambda: S.Sigmoid(alpha=3.5),
    "SoftSign": lambda: S.SoftSign(alpha=3.0),
    "ATan": lambda: S.ATan(alpha=2.5),
    "NonzeroSignLogAbs": lambda: S.NonzeroSignLogAbs(alpha=1.5),
    "Erf": lambda: S.Erf(alpha=2.5),
    "PiecewiseLeakyReLU": lambda: S.PiecewiseLeakyReLU(w=0.7, c=0.05),
    "SquarewaveFourierSeries": lambda: S.SquarewaveFourierSeries(n=3, T_period=6.0),
    "S2NN": lambda: S.S2NN(alpha=3.0, beta=0.7),
    "QPseudoSpike": lambda: S.QPseudoSpike(alpha=2.5),
    "LeakyKReLU": lambda: S.LeakyKReLU(leak=0.1, k=0.9),
    "FakeNumericalGradient": lambda: S.FakeNumericalGradient(alpha=0.4),
    "LogTailedReLU": lambda: S.LogTailedReLU(alpha=0.05),
}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
RESETS = [0.0, -0.2, None]  # hard reset to 0, hard reset elsewhere, soft reset


def covering(factors: dict, plus: list[dict] = ()) -> list[dict]:
    """Every pair of factor values appears in some case (allpairspy), plus the ``plus`` cases."""
    names = list(factors)
    cases = [dict(zip(names, row)) for row in AllPairs([factors[n] for n in names])]
    return cases + list(plus)


# The time-sharding tests' groups: kind x reset x dtype.
SHARD_KINDS = ["if", "lif", "plif"]
_SHARD_SURROGATES = ("Sigmoid", "ATan", "PiecewiseQuadratic", "Erf")


def shard_group_options(kind: str, v_reset, dtype: torch.dtype) -> dict:
    """The options that pick a kernel variant (surrogate, decay_input, detach_reset, store_v_seq)
    for one kind x reset x dtype group of the time-sharding tests. The parity cases (_parity.py)
    and test_distributed_kernels both take them from here, so they launch the same host variants
    and those are built once. Every pair of these options' values meets in some group."""
    a, b, c = SHARD_KINDS.index(kind), RESETS.index(v_reset), DTYPES.index(dtype)
    g = (a * len(RESETS) + b) * len(DTYPES) + c
    return dict(surrogate=SURROGATES[_SHARD_SURROGATES[(a + b + c) % len(_SHARD_SURROGATES)]](),
                decay_input=(b + c) % 2 == 0, detach_reset=g % 5 == 0, store_v_seq=g % 3 == 0)


def case_id(case: dict) -> str:
    def short(v):
        if isinstance(v, torch.dtype):
            return str(v).replace("torch.", "")
        return str(v)
    return "-".join(f"{k}={short(v)}" for k, v in case.items())


def grad_tolerance(dtype: torch.dtype) -> dict:
    """Gradients are computed in the state precision and rounded once to ``dtype``."""
    return {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6),
            torch.float16: dict(rtol=2e-3, atol=2e-4), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-3)}[dtype]


def assert_grad_close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = grad_tolerance(dtype)
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(ours.to(ref.dtype), ref, rtol=tol["rtol"], atol=tol["atol"] * scale,
                               msg=lambda m: f"{what}: {m}")


def near_threshold_mismatches(spike_a, spike_b, h_exact, v_threshold, dtype) -> tuple[int, int]:
    """(explained, unexplained) neurons whose spike trains differ. A neuron's first differing
    step is explained when the exact h there lies within rounding of the threshold for ``dtype``
    (after that step the trajectories legitimately diverge)."""
    eps = torch.finfo(dtype).eps
    differ = (spike_a != spike_b).reshape(spike_a.shape[0], -1)
    h = h_exact.reshape(h_exact.shape[0], -1)
    explained = unexplained = 0
    for n in torch.nonzero(differ.any(0)).flatten().tolist():
        t = torch.nonzero(differ[:, n]).flatten()[0].item()
        margin = 64 * eps * max(1.0, abs(h[t, n].item()), abs(v_threshold))
        if abs(h[t, n].item() - v_threshold) <= margin:
            explained += 1
        else:
            unexplained += 1
    return explained, unexplained


def stable_seed(case: dict) -> int:
    """A per-case seed that does not change between runs (str hash() is salted per process)."""
    return zlib.crc32(case_id(case).encode())


def spiking_resnet18(backend: str) -> torch.nn.Module:
    """The issue's Spiking-ResNet18 (LIF tau=1.25, no input decay, threshold 0.3, Sigmoid(4)),
    multi-step, on ``backend``, with fixed initial weights."""
    torch.manual_seed(0)
    net = spiking_resnet.spiking_resnet18(spiking_neuron=neuron.LIFNode, tau=1.25, decay_input=False,
                                          v_threshold=0.3, surrogate_function=S.Sigmoid(alpha=4.),
                                          num_classes=10)
    functional.set_step_mode(net, "m")
    functional.set_backend(net, backend)
    return net
