"""Backend 'temporal_fusion' on SpikingJelly's own nodes, every class a registered model serves,
against its 'torch' backend: same spikes, state, v_seq and gradients (learnable parameters
included), over each model's option grid, across consecutive calls, functional.reset_net and
detach_net, in both step modes, in training and eval; plus a Spiking-ResNet18. The kernels keep
the state in fp32 for fp16/bf16 inputs, so there the torch backend runs in fp32 on the same inputs
and our outputs must equal its results rounded once to the input dtype."""
import copy
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, neuron, surrogate

import sj_temporal_fusion
from sj_temporal_fusion.neurons import REGISTRY
from sj_temporal_fusion.reference import lif_reference
from sj_temporal_fusion.frontends.common import node_options

from _grid import (spiking_resnet18, DTYPES, SURROGATES, assert_grad_close, case_id, covering,
                   near_threshold_mismatches)
from _models import MODELS
from _prebuild import call_variants
from _side_by_side import compare_calls, detach_net_gradients

# SpikingJelly 0.0.0.0.14's torch backward for NonzeroSignLogAbs raises a TypeError (it passes a
# tuple to its own backward); that surrogate is checked against the reference in test_functional.
SJ_SURROGATES = [s for s in SURROGATES if s != "NonzeroSignLogAbs"]


def _grid(model):
    mc = MODELS[model]
    factors = dict(mc.grid, surrogate=SJ_SURROGATES, dtype=DTYPES, store_v_seq=[False, True],
                   training=[True, False], step_mode=["m", "s"], calls=[1, 3])
    cases = [dict(model=model, **c) for c in covering(factors)]
    return [c for c in cases if not mc.sj_fails(dict(mc.fixed, **c))]


GRID = [case for model in REGISTRY for case in _grid(model)]


def kernel_variants(item):
    """The host variants of a grid case (tests/_prebuild.py): the forward, and in training the
    backward, with parameter gradients where the node has parameters (PLIF's w, KLIF's k)."""
    case = item.callspec.params.get("case")
    if case is None or item.originalname != "test_matches_torch_backend":
        return None
    node = _make(case, "temporal_fusion")
    options = node_options(node)
    names = call_variants(options.pop("model"), case["dtype"], options, options.pop("surrogate_function"),
                          param_grads=any(True for _ in node.parameters()), grad=case["training"])
    return names


def _make(case, backend):
    mc = MODELS[case["model"]]
    options = dict(mc.fixed, **{k: case[k] for k in mc.grid})
    node = mc.make_node(options, surrogate_function=SURROGATES[case["surrogate"]](), step_mode=case["step_mode"],
                        backend=backend, store_v_seq=case["store_v_seq"])
    node.train(case["training"])
    return node


def _states(node):
    return [getattr(node, name) for name in REGISTRY[node_options(node)["model"]].states]


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_matches_torch_backend(case):
    mc = MODELS[case["model"]]
    dtype = case["dtype"]
    ours, theirs = _make(case, "temporal_fusion"), _make(case, "torch")

    def compare_state(name, a, b, call):
        if mc.exact:
            assert torch.equal(a, b), f"{name} differs after call {call}"
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def compare_v_seq(a, b):
        if case["step_mode"] == "m":
            torch.testing.assert_close(a.v_seq, b.v_seq.to(dtype), rtol=0 if mc.exact else 1e-2,
                                       atol=0 if mc.exact else 1e-5)

    grads = compare_calls(case, ours, theirs, _states, compare_state, compare_v_seq)
    # SpikingJelly's LogTailedReLU rounds alpha through fp32 even for fp64 tensors (test_reference)
    sj_fp32 = case["surrogate"] == "LogTailedReLU"
    for name, a, b in grads or ():
        # learnable parameters are fp32: their gradients are accumulated in fp32 whatever the input dtype
        fp32 = dtype == torch.float64 and (sj_fp32 or not name.startswith("x"))
        assert_grad_close(a, b, torch.float32 if fp32 else dtype, f"grad {name}")


@pytest.mark.parametrize("model", list(REGISTRY))
def test_truncated_bptt_with_detach_net(model):
    """functional.detach_net between chunks (truncated BPTT, online training): the node's state is
    a fresh tensor, not a view, so it detaches in place, and gradients equal the torch backend's."""
    theirs, ours = (detach_net_gradients(model, lambda options: MODELS[model].make_node(
        options, step_mode="m", backend=backend)) for backend in ("torch", "temporal_fusion"))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert_grad_close(a, b, torch.float32, "grad")


def test_learnable_threshold_gets_its_gradient():
    """A v_threshold the user made an nn.Parameter is differentiated, as by the torch backend."""
    grads = []
    for backend in ("torch", "temporal_fusion"):
        node = neuron.LIFNode(tau=1.5, step_mode="m", backend=backend)
        node.v_threshold = torch.nn.Parameter(torch.tensor(0.6))
        x = torch.rand(7, 5, 11, generator=torch.Generator().manual_seed(1))
        node(x).sum().backward()
        grads.append(node.v_threshold.grad)
    assert grads[1] is not None and grads[1] != 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_per_channel_threshold_is_a_clear_error():
    node = neuron.LIFNode(step_mode="m", backend="temporal_fusion")
    node.v_threshold = torch.nn.Parameter(torch.ones(5))
    with pytest.raises(ValueError, match="v_threshold is a tensor of shape .5.*backend='torch'"):
        node(torch.rand(3, 5))


@pytest.mark.parametrize("step_mode, shape, match", [
    ("m", (0, 4), "T >= 1"), ("m", (), r"shape \(T, \*\)")])
def test_bad_node_input_is_a_clear_error(step_mode, shape, match):
    node = neuron.LIFNode(step_mode=step_mode, backend="temporal_fusion")
    with pytest.raises(ValueError, match=match):
        node(torch.rand(shape))


def test_register_and_unregister_are_symmetric():
    node = neuron.LIFNode(step_mode="s", backend="temporal_fusion")
    x = torch.rand(2, 3)
    try:
        sj_temporal_fusion.unregister()
        sj_temporal_fusion.unregister()  # idempotent
        assert not sj_temporal_fusion.registered()
        assert "temporal_fusion" not in neuron.LIFNode(step_mode="m").supported_backends
        for mode in ("s", "m"):
            node.step_mode = mode
            for training in (True, False):  # SpikingJelly's eval path would otherwise ignore the backend
                node.train(training)
                with pytest.raises(RuntimeError, match="register"):
                    node(x if mode == "s" else x.unsqueeze(0))
    finally:
        sj_temporal_fusion.register()
    assert sj_temporal_fusion.registered()
    node.step_mode = "s"
    assert node(x).shape == x.shape
    functional.set_backend(node, "torch")
    assert node(x).shape == x.shape


def test_pickles_naming_the_former_module_still_load():
    """Models pickled before the front ends moved name ``sj_temporal_fusion.spikingjelly._backend_name``:
    that module is the activation_based front end under its former name, in a fresh process too."""
    from sj_temporal_fusion.frontends.common import BACKEND_NAME
    stream = pickle.dumps(BACKEND_NAME, protocol=0)
    assert b"sj_temporal_fusion.frontends.common" in stream
    old = stream.replace(b"sj_temporal_fusion.frontends.common", b"sj_temporal_fusion.spikingjelly")
    code = ("import pickle, sys; mark = pickle.loads(sys.stdin.buffer.read()); "
            "import sj_temporal_fusion.spikingjelly as old, sj_temporal_fusion.frontends.activation_based as new; "
            "assert old is new, old; print(mark)")
    out = subprocess.run([sys.executable, "-c", code], input=old, capture_output=True)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "temporal_fusion"


@pytest.mark.slow  # a subprocess
def test_whole_model_loads_in_a_fresh_process(tmp_path):
    """A pickled model that uses the backend names this package, so unpickling imports (and so
    registers) it: loading works in a process that never imported sj_temporal_fusion."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), neuron.LIFNode(step_mode="m", backend="temporal_fusion"))
    assert pickle.loads(pickle.dumps(net))[1].backend == "temporal_fusion"
    path = tmp_path / "net.pt"
    torch.save(net, path)
    code = (f"import torch, sys; net = torch.load({str(path)!r}, weights_only=False); "
            f"y = net(torch.rand(3, 2, 4)); assert 'sj_temporal_fusion' in sys.modules; print(net[1].backend)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "temporal_fusion"


def test_every_neuron_class_switches_with_set_backend():
    # Every class the registry serves (test_neurons checks that it serves all SpikingJelly's).
    nodes = [cls(step_mode="m") for model in REGISTRY.values() for cls in model.classes]
    assert nodes
    net = torch.nn.Sequential(*nodes)
    functional.set_backend(net, "temporal_fusion")
    assert all(n.backend == "temporal_fusion" for n in nodes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_is_no_worse_than_torch_backend(dtype):
    """Against an fp64 oracle, the kernels (fp32 state) err less than the torch backend computing
    in the input dtype; where spikes differ, the exact h was within rounding of the threshold."""
    g = torch.Generator().manual_seed(5)
    x64 = torch.randn(32, 4096, generator=g, dtype=torch.float64) * 0.3 + 0.12
    x = x64.to(dtype)
    options = dict(tau=1.25, decay_input=False, v_threshold=0.3, v_reset=0.0)
    ours = neuron.LIFNode(step_mode="m", backend="temporal_fusion", store_v_seq=True, **options)
    torch_node = neuron.LIFNode(step_mode="m", backend="torch", store_v_seq=True, **options)
    with torch.no_grad():
        y, y_torch = ours(x), torch_node(x)
        y_exact, _, v_exact = lif_reference(x.double(), store_v_seq=True, **options, kind="lif")
        # exact pre-spike h from the exact state: h_t = charge(v_{t-1}, x_t)
        v_prev = torch.cat([torch.zeros_like(v_exact[:1]), v_exact[:-1]])
        h_exact = v_prev * (1 - 1 / 1.25) + x.double()
    for spikes, who in ((y, "temporal_fusion"), (y_torch, "torch")):
        explained, unexplained = near_threshold_mismatches(spikes.double(), y_exact, h_exact, 0.3, dtype)
        assert unexplained == 0, f"{who}: spikes differ away from the threshold"
        assert explained <= 0.02 * x.shape[1]
    agree = (y.double() == y_exact).all(0) & (y_torch.double() == y_exact).all(0)
    err_ours = (ours.v_seq.double() - v_exact)[:, agree].abs().max()
    err_torch = (torch_node.v_seq.double() - v_exact)[:, agree].abs().max()
    assert err_ours <= err_torch + torch.finfo(dtype).eps


def test_reset_net_and_state_shape_error():
    node = neuron.IzhikevichNode(step_mode="m", backend="temporal_fusion", w_rest=0.1)
    node(torch.rand(4, 3, 5))
    with pytest.raises(ValueError, match="reset_net"):
        node(torch.rand(4, 3, 6))
    functional.reset_net(node)
    assert node.v == 0.0 and node.w == 0.1
    assert node(torch.rand(4, 3, 6)).shape == (4, 3, 6)


def test_set_backend_and_subclass_with_own_dynamics():
    class Quadratic(neuron.LIFNode):
        def neuronal_charge(self, x):
            self.v = self.v + x * x

    net = torch.nn.Sequential(neuron.LIFNode(step_mode="m"), Quadratic(step_mode="m"))
    functional.set_backend(net, "temporal_fusion")
    assert net[0].backend == "temporal_fusion"
    assert net[1].backend == "torch"  # the kernels cannot run a changed neuronal_charge
    assert "temporal_fusion" not in net[1].supported_backends


def test_node_options_carry_every_setting():
    node = neuron.ParametricLIFNode(init_tau=3.0, decay_input=False, v_threshold=0.7, v_reset=None,
                                    detach_reset=True, surrogate_function=surrogate.ATan(alpha=3.0))
    opts = node_options(node)
    assert opts["model"] == "lif" and opts["kind"] == "plif" and opts["w"] is node.w
    assert opts["decay_input"] is False and opts["v_threshold"] == 0.7 and opts["v_reset"] is None
    assert opts["detach_reset"] is True and isinstance(opts["surrogate_function"], surrogate.ATan)
    izh = node_options(neuron.IzhikevichNode(tau_w=5.0, a=0.2, b=0.3, w_rest=0.1))
    assert (izh["model"], izh["tau_w"], izh["a"], izh["b"], izh["w_rest"]) == ("izhikevich", 5.0, 0.2, 0.3, 0.1)


def test_spiking_resnet18_matches_torch_backend():
    net_torch = spiking_resnet18("torch")
    net_fused = copy.deepcopy(net_torch)
    functional.set_backend(net_fused, "temporal_fusion")
    assert all(m.backend == "temporal_fusion" for m in net_fused.modules() if isinstance(m, neuron.LIFNode))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, 3, 32, 32, generator=g)  # (T, B, C, H, W)
    target = torch.tensor([1, 4, 7])
    losses = []
    for net in (net_torch, net_fused):
        loss = F.cross_entropy(net(x).mean(0), target)
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])  # forward is bitwise identical in fp32
    for (name, p), q in zip(net_torch.named_parameters(), net_fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * max(1.0, p.grad.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")
