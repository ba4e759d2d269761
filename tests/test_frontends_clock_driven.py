"""Backend 'temporal_fusion' on SpikingJelly 0.0.0.0.14's clock_driven multi-step nodes against their
'torch' backend, with those classes' contract: v_seq always kept and differentiable, v its last
step, reset_net, their own surrogate classes with their parameters, their defaults (EIF's, PLIF's
init_tau and the gradient of w), fp16/bf16 inputs, training and eval; given to the constructor or
assigned on a built node; pickled models load in a fresh process."""
import pickle
import subprocess
import sys

import pytest
import torch
from spikingjelly.clock_driven import functional, neuron, surrogate

import sj_temporal_fusion
from sj_temporal_fusion import surrogate as surrogate_table
from sj_temporal_fusion.frontends import clock_driven
from sj_temporal_fusion.frontends.common import node_options

CLASSES = {
    "if": (neuron.MultiStepIFNode, [dict(), dict(v_reset=None, detach_reset=True)]),
    "lif": (neuron.MultiStepLIFNode, [dict(tau=2.0, detach_reset=True), dict(tau=1.5, decay_input=False, v_reset=None),
                                       dict(tau=3.0, v_reset=-0.2, v_threshold=0.5)]),
    "plif": (neuron.MultiStepParametricLIFNode, [dict(), dict(init_tau=3.0, decay_input=False, v_reset=None)]),
    "eif": (neuron.MultiStepEIFNode, [dict(), dict(tau=3.0, delta_T=0.5, theta_rh=0.6, v_rest=0.1, v_reset=None)]),
}
CASES = [(kind, i) for kind, (_, options) in CLASSES.items() for i in range(len(options))]
# Each clock_driven surrogate with parameters other than its defaults, so a dropped one shows.
SURROGATES = {
    "PiecewiseQuadratic": surrogate.PiecewiseQuadratic(alpha=1.5), "PiecewiseExp": surrogate.PiecewiseExp(alpha=1.5),
    "Sigmoid": surrogate.Sigmoid(alpha=3.0), "SoftSign": surrogate.SoftSign(alpha=3.0),
    "ATan": surrogate.ATan(alpha=3.0), "NonzeroSignLogAbs": surrogate.NonzeroSignLogAbs(alpha=1.5),
    "Erf": surrogate.Erf(alpha=3.0), "PiecewiseLeakyReLU": surrogate.PiecewiseLeakyReLU(w=0.5, c=0.05),
    "SquarewaveFourierSeries": surrogate.SquarewaveFourierSeries(n=3, T_period=6.0),
    "S2NN": surrogate.S2NN(alpha=3.0, beta=0.5), "QPseudoSpike": surrogate.QPseudoSpike(alpha=3.0),
}


def pair(cls, **options):
    reference = cls(backend="torch", **options)
    ours = cls(backend="temporal_fusion", **options)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def run(node, calls):
    """Consecutive calls carrying the state, then one loss on the spikes and on v_seq of every call
    (codebases read v_seq as an output), so gradients also cross from call to call through v."""
    outputs, loss = [], 0
    for x, g_spike, g_v_seq in calls:
        x = x.clone().requires_grad_()
        spike = node(x)
        loss = loss + (spike * g_spike + node.v_seq * g_v_seq).sum()
        outputs.append([x, spike, node.v_seq, node.v])
    loss.backward()
    return [(spike, v_seq, v, x.grad) for x, spike, v_seq, v in outputs]


def inputs(seed, shape=(6, 3, 7)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.8 + 0.4
    return x, torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind, i", CASES)
def test_matches_torch_backend(kind, i, training):
    """Two calls carrying the state, reset_net, a call on another batch size: spikes, v_seq and v
    bit for bit in fp32 (EIF to rounding: its exp rounds differently), gradients to rounding."""
    cls, options = CLASSES[kind][0], CLASSES[kind][1][i]
    reference, ours = pair(cls, surrogate_function=surrogate.ATan(alpha=3.0), **options)
    for node in (reference, ours):
        node.train(training)
    exact = kind != "eif"
    for batch, (shapes, seed) in enumerate((([(6, 3, 7), (6, 3, 7)], 0), ([(4, 5, 7)], 2))):
        calls = [inputs(seed + j, shape) for j, shape in enumerate(shapes)]
        for call, (got, want) in enumerate(zip(run(ours, calls), run(reference, calls))):
            for name, a, b in zip(("spike", "v_seq", "v", "grad x"), got, want):
                if exact and name != "grad x":
                    assert torch.equal(a, b), f"batch {batch} call {call}: {name}"
                else:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"batch {batch} call {call}: {name}: {m}")
            assert torch.equal(got[2], got[1][-1])  # v is v_seq's last step
        for p, q in zip(reference.parameters(), ours.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)  # PLIF's w
        functional.reset_net(reference)
        functional.reset_net(ours)
        assert ours.v == reference.v and ours.v_seq is None


@pytest.mark.parametrize("name", list(SURROGATES))
def test_each_clock_driven_surrogate_with_its_parameters(name):
    sg = SURROGATES[name]
    assert type(sg).__module__ == "spikingjelly.clock_driven.surrogate"
    reference, ours = pair(neuron.MultiStepLIFNode, tau=2.0, surrogate_function=sg)
    (got,), (want,) = run(ours, [inputs(3)]), run(reference, [inputs(3)])
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-6)


def test_surrogate_ids_follow_the_activation_based_namesakes():
    from spikingjelly.activation_based import surrogate as ab
    assert len(surrogate_table.CLOCK_DRIVEN) == 11
    for cls, sg_id in surrogate_table.CLOCK_DRIVEN.items():
        assert surrogate_table.NAMES[getattr(ab, cls.__name__)] == sg_id
    assert surrogate_table.spec(surrogate.PiecewiseLeakyReLU(w=0.5, c=0.05))[1:] == (0.5, 0.05)


def test_defaults():
    """No-argument nodes: the options SpikingJelly's constructors set, PLIF's w = -log(init_tau - 1)
    with its gradient, EIF's tau, delta_T, theta_rh, v_rest and v_reset = -0.1."""
    eif = node_options(neuron.MultiStepEIFNode(backend="temporal_fusion"))
    assert {k: eif[k] for k in ("tau", "delta_T", "theta_rh", "v_threshold", "v_rest", "v_reset")} == dict(
        tau=2.0, delta_T=1.0, theta_rh=0.8, v_threshold=1.0, v_rest=0.0, v_reset=-0.1)
    assert isinstance(eif["surrogate_function"], surrogate.Sigmoid) and eif["detach_reset"] is False
    reference, ours = pair(neuron.MultiStepParametricLIFNode, init_tau=4.0)
    assert node_options(ours)["w"] is ours.w and torch.equal(ours.w, reference.w)
    (got,), (want,) = run(ours, [inputs(4)]), run(reference, [inputs(4)])
    assert torch.equal(got[0], want[0]) and reference.w.grad != 0
    torch.testing.assert_close(ours.w.grad, reference.w.grad, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_under_autocast(dtype):
    """fp16/bf16 inputs (as autocast hands them over): the kernels keep an fp32 state, so spikes and
    v_seq are the torch backend's fp32 results rounded once to the input dtype, v is its fp32 v."""
    reference, ours = pair(neuron.MultiStepLIFNode, tau=2.0, detach_reset=True, surrogate_function=surrogate.ATan())
    linear = torch.nn.Linear(7, 7)
    x = torch.randn(6, 3, 7)
    with torch.autocast("cpu", dtype=dtype):
        h = linear(x)
        assert h.dtype == dtype
        spike = ours(h)
        spike_ref = reference(h.float())
    assert spike.dtype == ours.v_seq.dtype == dtype and ours.v.dtype == torch.float32
    assert torch.equal(spike, spike_ref.to(dtype)) and torch.equal(ours.v_seq, reference.v_seq.to(dtype))
    assert torch.equal(ours.v, reference.v)
    spike.float().sum().backward()
    assert linear.weight.grad is not None and torch.isfinite(linear.weight.grad).all()


def test_backend_assigned_on_a_built_node_and_back():
    node = neuron.MultiStepLIFNode(tau=2.0)
    x = torch.rand(4, 2, 3)
    calls = []
    original = clock_driven.neuron_multi_step
    try:
        clock_driven.neuron_multi_step = lambda *a, **k: calls.append(1) or original(*a, **k)
        node.backend = "temporal_fusion"
        assert node.backend == "temporal_fusion" and node.__dict__["backend"] == "temporal_fusion"
        node(x)
        node.backend = "torch"
        functional.reset_net(node)
        node(x)
    finally:
        clock_driven.neuron_multi_step = original
    assert calls == [1]
    assert "backend=temporal_fusion" in repr(neuron.MultiStepLIFNode(backend="temporal_fusion"))


def test_subclasses():
    class Keeps(neuron.MultiStepLIFNode):  # keeps the dynamics: served
        def __init__(self):
            super().__init__(tau=2.0, detach_reset=True, backend="temporal_fusion")

    class Quadratic(neuron.MultiStepLIFNode):
        def neuronal_charge(self, x):
            self.v = self.v + x * x

    assert Keeps()(torch.rand(3, 2)).shape == (3, 2)
    with pytest.raises(ValueError, match="neuronal_charge"):
        Quadratic(backend="temporal_fusion")
    node = Quadratic()
    with pytest.raises(ValueError, match="neuronal_charge"):
        node.backend = "temporal_fusion"
    assert node.backend == "torch"


def test_clear_errors():
    with pytest.raises(ValueError, match=r"\(T, N, \*\)"):
        neuron.MultiStepLIFNode(backend="temporal_fusion")(torch.rand(5))
    with pytest.raises(NotImplementedError, match="no_such_backend"):
        neuron.MultiStepLIFNode(backend="no_such_backend")  # SpikingJelly's own check still runs


def test_register_and_unregister_are_symmetric():
    node = neuron.MultiStepIFNode(backend="temporal_fusion")
    x = torch.rand(3, 4)
    try:
        sj_temporal_fusion.unregister()
        sj_temporal_fusion.unregister()
        assert not sj_temporal_fusion.registered()
        with pytest.raises(NotImplementedError, match="register"):
            neuron.MultiStepIFNode(backend="temporal_fusion")
        for training in (True, False):
            node.train(training)
            with pytest.raises(RuntimeError, match="register"):
                node(x)
        assert neuron.MultiStepIFNode(backend="torch")(x).shape == x.shape
    finally:
        sj_temporal_fusion.register()
    assert sj_temporal_fusion.registered() and node(x).shape == x.shape


@pytest.mark.slow  # a subprocess
def test_whole_model_loads_in_a_fresh_process(tmp_path):
    """Constructed or assigned, the backend pickles as this package's name: loading imports (and so
    registers) it in a process that never imported sj_temporal_fusion."""
    assigned = neuron.MultiStepParametricLIFNode()
    assigned.backend = "temporal_fusion"
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), neuron.MultiStepLIFNode(backend="temporal_fusion"), assigned)
    assert pickle.loads(pickle.dumps(net))[2].backend == "temporal_fusion"
    path = tmp_path / "net.pt"
    torch.save(net, path)
    code = (f"import torch, sys; net = torch.load({str(path)!r}, weights_only=False); "
            f"y = net(torch.rand(3, 2, 4)); assert 'sj_temporal_fusion' in sys.modules; "
            f"print(net[1].backend, net[2].backend, tuple(net[2].v_seq.shape))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["temporal_fusion", "temporal_fusion", "(3,", "2,", "4)"]
