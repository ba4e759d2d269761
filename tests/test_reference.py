"""The oracle checked against SpikingJelly itself: its surrogate derivatives equal SpikingJelly's
autograd for every surrogate, and the kernels' surrogate table agrees with it element-wise."""
import re

import pytest
import torch

from sj_temporal_fusion import surrogate as specs
from sj_temporal_fusion.functional import lif_multi_step
from sj_temporal_fusion.reference import surrogate_grad

from _grid import SURROGATES
from _prebuild import call_variants

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


# The kernel check's neuron: IF, detach_reset, fp64.
KERNEL_OPTIONS = dict(kind="if", v_threshold=0.5, detach_reset=True)


def kernel_variants(item):
    """The host variants of a surrogate's kernel check (tests/_prebuild.py)."""
    if item.originalname != "test_kernel_surrogate_table_matches_reference":
        return None
    sg = SURROGATES[item.callspec.params["name"]]()
    return call_variants("lif", torch.float64, KERNEL_OPTIONS, sg, False)


@pytest.mark.parametrize("name", list(SURROGATES))
def test_kernel_surrogate_table_matches_reference(name):
    """One step from v_init = 0 with x = threshold + X: grad_x = g'(X) exactly where the kernel
    and the reference agree on the surrogate (IF, detach_reset, fp64)."""
    sg = SURROGATES[name]()
    spec = specs.spec(sg)
    x = (X + 0.5).reshape(1, -1).clone().requires_grad_()
    spike, _, _ = lif_multi_step(x, torch.zeros(X.shape, dtype=torch.float64), surrogate_function=sg,
                                 **KERNEL_OPTIONS)
    grad, = torch.autograd.grad(spike.sum(), x)
    expected = surrogate_grad(spec.id, x.detach()[0] - 0.5, spec.a, spec.b)
    torch.testing.assert_close(grad[0], expected, rtol=1e-13, atol=1e-13)


def test_every_spikingjelly_surrogate_is_supported():
    from spikingjelly.activation_based import surrogate as S
    classes = {c for c in vars(S).values() if isinstance(c, type) and issubclass(c, torch.nn.Module)
               and c not in (S.SurrogateFunctionBase, S.MultiArgsSurrogateFunctionBase)}
    assert classes == {getattr(S, s.cls) for s in specs.SURROGATES}
    assert len(classes) == 14


def test_table_ids_are_positions():
    # spec() and the oracle index the table by id
    assert [s.id for s in specs.SURROGATES] == list(range(len(specs.SURROGATES)))
    assert len({s.name for s in specs.SURROGATES}) == len({s.cls for s in specs.SURROGATES}) == len(specs.SURROGATES)


def kernel_header_surrogates(text: str) -> tuple[dict, set]:
    """({NAME: id} of the SG_* defines, {NAME} of the switch's cases) in surrogate.cuh's text."""
    defines = {name: int(value) for name, value in re.findall(r"^#define SG_(\w+) (\d+)\s*$", text, re.M)}
    cases = set(re.findall(r"\bcase SG_(\w+)\s*:", text))
    return defines, cases


def check_kernel_header(text: str) -> list[str]:
    """What surrogate.cuh's text gets wrong about the surrogate table (empty: nothing)."""
    defines, cases = kernel_header_surrogates(text)
    table = {s.name.upper(): s.id for s in specs.SURROGATES}
    problems = [f"SG_{n} is {defines.get(n)} in the header, {i} in the table" for n, i in table.items()
                if defines.get(n) != i]
    problems += [f"SG_{n} = {i} in the header has no table entry" for n, i in defines.items() if n not in table]
    problems += [f"SG_{n} has no case in surrogate_grad's switch" for n in table if n not in cases]
    problems += [f"case SG_{n} has no table entry" for n in cases - set(table)]
    return problems


def test_kernel_header_agrees_with_the_table():
    from pathlib import Path
    header = (Path(specs.__file__).parent / "csrc" / "surrogate.cuh").read_text()
    assert check_kernel_header(header) == []


def test_header_check_can_fail():
    from pathlib import Path
    header = (Path(specs.__file__).parent / "csrc" / "surrogate.cuh").read_text()
    assert check_kernel_header(header.replace("#define SG_ATAN 4", "#define SG_ATAN 5")) == [
        "SG_ATAN is 5 in the header, 4 in the table"]
    assert check_kernel_header(header.replace("case SG_ERF:", "case 6:")) == ["SG_ERF has no case in surrogate_grad's switch"]
    extra = header.replace("#define SG_ERF 6", "#define SG_ERF 6\n#define SG_NEW 14")
    assert check_kernel_header(extra) == ["SG_NEW = 14 in the header has no table entry"]


def test_every_table_entry_has_a_test_constructor():
    """tests/_grid.py builds each table entry's class with parameters other than its defaults, so a
    parameter dropped or swapped on the way to the kernel changes the gradient."""
    assert set(SURROGATES) == {s.cls for s in specs.SURROGATES}
    for s in specs.SURROGATES:
        built, default = SURROGATES[s.cls](), type(SURROGATES[s.cls]())()
        assert type(built).__name__ == s.cls
        for attribute in filter(None, s.params):
            assert getattr(built, attribute) != getattr(default, attribute), f"{s.cls}.{attribute} is its default"


def test_unknown_id_is_a_clear_error():
    with pytest.raises(ValueError, match="sg_id=14 is no surrogate id"):
        surrogate_grad(14, X, 1.0, 0.0)
