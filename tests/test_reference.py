"""The oracle checked against SpikingJelly itself: its surrogate derivatives equal SpikingJelly's
autograd for every surrogate, and the kernels' surrogate table agrees with it element-wise."""
import pytest
import torch

from sj_temporal_fusion import surrogate as specs
from sj_temporal_fusion.functional import lif_multi_step
from sj_temporal_fusion.reference import surrogate_grad

from _grid import SURROGATES

# Points on both sides of every kink (|x| = 1/alpha, w, 0, 1) and far out.
X = torch.cat([torch.linspace(-3, 3, 601, dtype=torch.float64),
               torch.tensor([-1e-9, 1e-9, 0.5, 1.0, 1.5, 2.0, 2.0 / 3.0, 0.7, -0.7], dtype=torch.float64)])


@pytest.mark.parametrize("name", list(SURROGATES))
def test_reference_surrogate_matches_spikingjelly(name):
    sg = SURROGATES[name]()
    spec = specs.spec(sg)
    ours = surrogate_grad(spec.id, X, spec.a, spec.b)
    x = X.clone().requires_grad_()
    if name == "NonzeroSignLogAbs":
        # SpikingJelly 0.0.0.0.14's autograd backward for it raises TypeError; use its static
        # backward, which is the documented derivative 1 / (1/alpha + |x|).
        theirs = type(sg).backward(torch.ones_like(X), X, sg.alpha)
    else:
        spikes = sg(x)
        assert torch.equal(spikes.detach(), (X >= 0).to(X))
        theirs, = torch.autograd.grad(spikes.sum(), x)
    # LogTailedReLU: SpikingJelly stores alpha through an fp32 scalar even for fp64 tensors.
    rtol = 1e-7 if name == "LogTailedReLU" else 1e-12
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("name", list(SURROGATES))
def test_kernel_surrogate_table_matches_reference(name):
    """One step from v_init = 0 with x = threshold + X: grad_x = g'(X) exactly where the kernel
    and the reference agree on the surrogate (IF, detach_reset, fp64)."""
    sg = SURROGATES[name]()
    spec = specs.spec(sg)
    x = (X + 0.5).reshape(1, -1).clone().requires_grad_()
    spike, _, _ = lif_multi_step(x, torch.zeros(X.shape, dtype=torch.float64), kind="if", v_threshold=0.5,
                                 detach_reset=True, surrogate_function=sg)
    grad, = torch.autograd.grad(spike.sum(), x)
    expected = surrogate_grad(spec.id, x.detach()[0] - 0.5, spec.a, spec.b)
    torch.testing.assert_close(grad[0], expected, rtol=1e-13, atol=1e-13)


def test_every_spikingjelly_surrogate_is_supported():
    from spikingjelly.activation_based import surrogate as S
    classes = {c for c in vars(S).values() if isinstance(c, type) and issubclass(c, torch.nn.Module)
               and c not in (S.SurrogateFunctionBase, S.MultiArgsSurrogateFunctionBase)}
    assert classes == {cls for cls, _, _ in specs.SURROGATES}
    assert len(classes) == 14


def test_surrogate_ids_match_the_kernel_header():
    from pathlib import Path
    header = (Path(specs.__file__).parent / "csrc" / "surrogate.cuh").read_text()
    for index, (_, c_name, _) in enumerate(specs.SURROGATES):
        assert f"#define {c_name} {index}\n" in header
