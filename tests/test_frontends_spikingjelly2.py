"""The SpikingJelly 2.x front end (frontends/spikingjelly2.py) against SpikingJelly 2's own path, on
the CPU: the same spikes, state, v_seq and gradients (learnable parameters included) over each
model's covering grid (tests/_models.py) x surrogates x dtypes x store_v_seq x train/eval x step
mode x consecutive calls; nothing changed before the switch, the switch back exact; reset_net,
detach_net, pickling, the report; SpikingJelly 2's Spiking-ResNet18 with optimize(net).

Run under SpikingJelly 2.x (PYTHONPATH=.venv-sj2); under 0.0.0.0.14 the module skips. Where the two
differ in rounding (SpikingJelly 2 writes LIF/PLIF without input decay as v - (v - v_reset) / tau + x,
Izhikevich's w update divides by tau_w, its fp16/bf16 state is kept in the input dtype) the
comparison is to rounding; fp16/bf16 inputs are compared with SpikingJelly 2 run in fp32 on the same
values, as the kernels keep the state in fp32."""
import pickle
import subprocess
import sys

import pytest
import torch

from sj_temporal_fusion import versions

if versions.GENERATION != 2:
    pytest.skip(f"tests the SpikingJelly 2.x front end; installed: spikingjelly {versions.VERSION} "
                f"(run with PYTHONPATH=.venv-sj2)", allow_module_level=True)

from spikingjelly.activation_based import functional, neuron, surrogate  # noqa: E402

import sj_temporal_fusion  # noqa: E402
from sj_temporal_fusion.frontends import spikingjelly2  # noqa: E402
from sj_temporal_fusion.neurons import REGISTRY  # noqa: E402

from _grid import DTYPES, SURROGATES, assert_grad_close, case_id, covering  # noqa: E402
from _models import MODELS  # noqa: E402
from _side_by_side import compare_calls, detach_net_gradients  # noqa: E402
from conftest import STATE_DTYPE  # noqa: E402

# Its derivative differs from 0.0.0.0.14's (the kernel's): refused, tested below.
PARITY_SURROGATES = [s for s in SURROGATES if s not in spikingjelly2.DIFFERENT_SURROGATES]


def _differs(case) -> bool:
    """Izhikevich's detached hard reset to v_reset != 0: SpikingJelly 2's dynamics differ, refused
    (test_differing_dynamics_are_refused)."""
    return case["model"] == "izhikevich" and case["detach_reset"] and case["v_reset"] not in (None, 0.0)


def _grid(model):
    mc = MODELS[model]
    factors = dict(mc.grid, surrogate=PARITY_SURROGATES, dtype=DTYPES, store_v_seq=[False, True],
                   training=[True, False], step_mode=["m", "s"], calls=[1, 3])
    return [dict(model=model, **c) for c in covering(factors) if not _differs(dict(model=model, **c))]


GRID = [case for model in REGISTRY for case in _grid(model)]


def _make(case, switched: bool):
    mc = MODELS[case["model"]]
    options = dict(mc.fixed, **{k: case[k] for k in mc.grid})
    node = mc.make_node(options, surrogate_function=SURROGATES[case["surrogate"]](), step_mode=case["step_mode"],
                        store_v_seq=case["store_v_seq"])
    node.train(case["training"])
    if switched:
        report = sj_temporal_fusion.set_backend(node, "temporal_fusion")
        assert report.switched == {"": type(node).__name__}, str(report)
    return node


def _states(node):
    return [getattr(node, name) for name in REGISTRY[spikingjelly2.node_options(node)["model"]].states]


def _state_tolerance(acc, node):
    """The two round the same formulas in different orders (module docstring): a few ulps per
    step. PLIF's w and KLIF's k are fp32 parameters, and SpikingJelly 2 rounds terms made from
    them (1 - sigmoid(w), v_threshold / k) in fp32 where the kernels round them otherwise, so
    with parameters an fp64 state agrees to fp32 rounding."""
    if acc == torch.float64 and not any(True for _ in node.parameters()):
        return dict(rtol=1e-12, atol=1e-12)
    return dict(rtol=2e-6, atol=2e-6)


def _assert_v_seq_close(ours, theirs):
    """v_seq in our dtype (the input's in step mode 'm', the state's in 's'): SpikingJelly 2's fp32
    values rounded once to it, so within one ulp of it."""
    eps = torch.finfo(ours.dtype).eps
    tol = dict(rtol=2e-6, atol=2e-6) if ours.dtype in (torch.float32, torch.float64) else dict(rtol=eps, atol=eps)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.to(ours.dtype), **tol)


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_matches_spikingjelly2(case):
    dtype, acc = case["dtype"], STATE_DTYPE[case["dtype"]]
    ours, theirs = _make(case, True), _make(case, False)

    def compare_state(name, a, b, call):
        torch.testing.assert_close(a, b.to(acc), **_state_tolerance(acc, ours),
                                   msg=lambda m: f"{name} after call {call}: {m}")

    def compare_v_seq(a, b):
        _assert_v_seq_close(a.v_seq, b.v_seq)

    for name, a, b in compare_calls(case, ours, theirs, _states, compare_state, compare_v_seq) or ():
        # Learnable parameters are fp32: their gradients are accumulated in fp32 whatever the input
        # dtype, and the factors made from them are rounded in fp32 differently (_state_tolerance).
        fp32 = dtype == torch.float64 and (not name.startswith("x") or any(True for _ in ours.parameters()))
        assert_grad_close(a, b, torch.float32 if fp32 else dtype, f"grad {name}")


def _lif(**kw):
    return neuron.LIFNode(tau=1.6, v_threshold=0.45, step_mode="m", **kw)


def test_nothing_changes_until_the_switch():
    """Importing the package (in a fresh process) leaves SpikingJelly 2's classes as they are."""
    code = ("import sj_temporal_fusion\nfrom spikingjelly.activation_based import neuron\n"
            "for cls in sj_temporal_fusion.frontends.spikingjelly2.NODES:\n"
            "    for name in ('multi_step_forward', 'single_step_forward'):\n"
            "        m = getattr(cls, name)\n"
            "        assert m.__module__.startswith('spikingjelly.'), (cls, name, m.__module__)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_fused_path_runs_and_the_switch_back_is_exact(monkeypatch):
    calls = []
    original = spikingjelly2.neuron_multi_step
    monkeypatch.setattr(spikingjelly2, "neuron_multi_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.rand(6, 3, 5, generator=torch.Generator().manual_seed(2))
    node, untouched = _lif(), _lif()
    sj_temporal_fusion.set_backend(node, "temporal_fusion")
    node(x)
    assert calls == [1], "the kernels did not run"
    report = sj_temporal_fusion.set_backend(node, "spikingjelly")
    assert report.switched == {"": "LIFNode"} and "backend" not in vars(node)
    functional.reset_net(node)
    assert torch.equal(node(x), untouched(x)) and torch.equal(node.v, untouched.v)
    assert calls == [1], "the switched-back node still ran the kernels"


def test_other_backends_are_a_clear_error():
    with pytest.raises(ValueError, match="has no backends.*'spikingjelly'"):
        sj_temporal_fusion.set_backend(_lif(), "torch")


def test_report_names_what_cannot_switch():
    net = torch.nn.Sequential(
        _lif(), neuron.LIFNode(tau=1.6, step_mode="m", surrogate_function=surrogate.PiecewiseLeakyReLU()),
        neuron.LIFNode(tau=1.6, step_mode="m", surrogate_function=surrogate.SuperSpike()),
        neuron.CUBALIFNode(), neuron.ILIFNode(step_mode="m"))
    report = sj_temporal_fusion.set_backend(net, "temporal_fusion")
    assert list(report.switched) == ["0"]
    assert "1/(2w)" in report.not_switched["1"]
    assert "SuperSpike" in report.not_switched["2"]
    assert "no temporal_fusion model serves CUBALIFNode" in report.not_switched["3"]
    assert "ILIFNode subclasses LIFNode with its own" in report.not_switched["4"]


def test_differing_dynamics_are_refused():
    node = neuron.IzhikevichNode(v_reset=-0.2, detach_reset=True, step_mode="m")
    report = sj_temporal_fusion.set_backend(node, "temporal_fusion")
    assert "detaches the spike in the hard reset's v_reset term" in report.not_switched[""]
    for v_reset in (0.0, None):  # no v_reset term: the dynamics agree
        node = neuron.IzhikevichNode(v_reset=v_reset, detach_reset=True, step_mode="m")
        assert sj_temporal_fusion.set_backend(node, "temporal_fusion").switched


def test_a_surrogate_changed_after_the_switch_is_refused():
    node = _lif()
    sj_temporal_fusion.set_backend(node, "temporal_fusion")
    node.surrogate_function = surrogate.PiecewiseLeakyReLU()
    with pytest.raises(NotImplementedError, match=r"1/\(2w\)"):
        node(torch.rand(3, 4))


def test_a_state_of_another_shape_restarts_as_in_spikingjelly2():
    ours, theirs = _lif(), _lif()
    sj_temporal_fusion.set_backend(ours, "temporal_fusion")
    for shape in ((5, 3, 4), (5, 2, 7)):  # no reset_net between the two shapes
        x = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.6
        assert torch.equal(ours(x), theirs(x))
        torch.testing.assert_close(ours.v, theirs.v)


@pytest.mark.parametrize("model", list(REGISTRY))
def test_truncated_bptt_with_detach_net(model):
    def switched(node):
        sj_temporal_fusion.set_backend(node, "temporal_fusion")
        return node

    theirs = detach_net_gradients(model, lambda options: MODELS[model].make_node(options, step_mode="m"))
    ours = detach_net_gradients(model, lambda options: switched(MODELS[model].make_node(options, step_mode="m")))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert_grad_close(a, b, torch.float32, "grad")


def test_unregister_makes_a_switched_node_raise():
    node = _lif()
    sj_temporal_fusion.set_backend(node, "temporal_fusion")
    try:
        sj_temporal_fusion.unregister()
        with pytest.raises(RuntimeError, match="register"):
            node(torch.rand(2, 3))
    finally:
        sj_temporal_fusion.register()
    assert node(torch.rand(2, 3)).shape == (2, 3)


def test_whole_model_loads_in_a_fresh_process(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), _lif())
    sj_temporal_fusion.set_backend(net, "temporal_fusion")
    assert pickle.loads(pickle.dumps(net))[1].backend == "temporal_fusion"
    path = tmp_path / "net.pt"
    torch.save(net, path)
    code = (f"import torch, sys; net = torch.load({str(path)!r}, weights_only=False); "
            f"import sj_temporal_fusion.frontends.spikingjelly2 as f; calls = []; o = f.neuron_multi_step; "
            f"f.neuron_multi_step = lambda *a, **k: calls.append(1) or o(*a, **k); "
            f"net(torch.rand(3, 2, 4)); assert calls == [1], 'not fused after loading'; print('ok')")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _resnet18():
    from spikingjelly.activation_based.model import spiking_resnet
    torch.manual_seed(0)
    net = spiking_resnet.spiking_resnet18(spiking_neuron=neuron.LIFNode, tau=1.25, decay_input=False,
                                          v_threshold=0.3, surrogate_function=surrogate.Sigmoid(alpha=4.),
                                          num_classes=10)
    functional.set_step_mode(net, "m")
    return net


@pytest.mark.parametrize("optimize", [None, {}, {"fold_bn": True}])
def test_spiking_resnet18_from_the_model_zoo(optimize):
    """SpikingJelly 2's Spiking-ResNet18: one call switches every LIF node; loss and gradients
    equal its own path's to rounding, without optimize(net), with it (spike bits) and with its
    BatchNorms folded (the stem's and each block's bn1 -> sn1: 9 pairs found in its blocks)."""
    x = torch.rand(3, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    results = []
    for switched in (False, True):
        net = _resnet18()
        if switched:
            report = sj_temporal_fusion.set_backend(net, "temporal_fusion")
            assert len(report.switched) == 17 and not report.not_switched, str(report)
            if optimize is not None:
                net = sj_temporal_fusion.optimize(net, **optimize)
                assert len(sj_temporal_fusion.optimize.folded(net)) == (9 if optimize else 0)
        loss = net(x).mean(0).square().sum()
        loss.backward()
        results.append((loss.detach(), [p.grad for p in net.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    scale = max(g.abs().max().item() for g in results[0][1])
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * scale)


def test_an_unsupported_version_names_the_supported_ones():
    for version in ("0.0.0.0.13", "1.0.0", "3.0.0"):
        with pytest.raises(ImportError, match=r"0\.0\.0\.0\.14.*>=2\.0,<3"):
            versions._generation(version)
    assert versions._generation("2.1.3") == 2 and versions._generation("0.0.0.0.14") == 1


def test_bench_lif_and_net_take_its_own_path_as_a_method(tmp_path):
    """bench lif and bench net under SpikingJelly 2: its own path is method 'spikingjelly2', checked
    and timed beside temporal_fusion in one run (the switched node; the switched model, optimized
    too); 0.0.0.0.14's backends are skipped, saying why."""
    from sj_temporal_fusion.bench import net
    from sj_temporal_fusion.bench.__main__ import main
    common = ["--device", "cpu", "--quiet", "--no-plots"]
    lif_run = main(["lif", "--neurons", "301", "--T", "17", "--dtypes", "fp32", "--grad", "sum", "--methods",
                    "temporal_fusion,spikingjelly2,torch", "--reps", "3", "--warmup", "1", "--max-seconds", "0.1",
                    "--no-flush", "--out", str(tmp_path / "lif"), *common])
    rows = {(r["method"], r["mode"]): r for r in lif_run["results"]}
    for mode in ("infer", "train"):
        for method in ("temporal_fusion", "spikingjelly2"):
            assert rows[(method, mode)]["status"] == "ok", rows[(method, mode)]
        assert rows[("torch", mode)]["status"] == "skipped" and "has no backends" in rows[("torch", mode)]["reason"]
    net_run = main(["net", "--T", "2", "--batch", "2", "--image-size", "16", "--reps", "1", "--min-reps", "1",
                    "--warmup", "0", "--no-profile", "--out", str(tmp_path / "net"), *common])
    rows = {(r["method"], r["mode"]): r for r in net_run["results"]}
    assert net.REFERENCE == "spikingjelly2" and len(rows) == len(net.DEFAULT_METHODS) * len(net.MODES)
    for (method, mode), r in rows.items():
        assert r["status"] == "ok", r
        if mode == "train":
            assert r["grad_rel_diff_vs_spikingjelly2"] < 1e-4, r
    assert rows[("spikingjelly2", "train")]["speedup_vs_spikingjelly2"] == 1.0
    assert rows[("temporal_fusion+spike_bits", "train")]["grad_bitwise_equal_to_temporal_fusion"] is True
