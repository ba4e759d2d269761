"""Backend 'temporal_fusion' on SpikingJelly's own nodes against its 'torch' backend: same
spikes, state, v_seq and gradients, over the option grid, across consecutive calls and
functional.reset_net, in both step modes, in training and eval; plus a Spiking-ResNet18."""
import copy

import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, neuron, surrogate

import sj_temporal_fusion  # noqa: F401  (registers the backend)
from sj_temporal_fusion.reference import lif_reference
from sj_temporal_fusion.spikingjelly import node_options

from _grid import (spiking_resnet18, DTYPES, RESETS, SURROGATES, assert_grad_close, case_id, covering, stable_seed,
                   near_threshold_mismatches)
from conftest import STATE_DTYPE

NODES = {"IFNode": neuron.IFNode, "LIFNode": neuron.LIFNode, "ParametricLIFNode": neuron.ParametricLIFNode}
# SpikingJelly 0.0.0.0.14's torch backward for NonzeroSignLogAbs raises a TypeError (it passes a
# tuple to its own backward); that surrogate is checked against the reference in test_functional.
SJ_SURROGATES = [s for s in SURROGATES if s != "NonzeroSignLogAbs"]

GRID = covering(
    dict(node=list(NODES), v_reset=RESETS, decay_input=[True, False], detach_reset=[False, True],
         surrogate=SJ_SURROGATES, dtype=DTYPES, store_v_seq=[False, True], training=[True, False],
         step_mode=["m", "s"], calls=[1, 3]),
    plus=[dict(node=n, v_reset=r, decay_input=d, detach_reset=False, surrogate="Sigmoid",
               dtype=torch.float32, store_v_seq=True, training=True, step_mode="m", calls=2)
          for n in NODES for r in RESETS for d in [True, False]])


def _make(case, backend):
    kwargs = dict(v_threshold=0.45, v_reset=case["v_reset"], detach_reset=case["detach_reset"],
                  surrogate_function=SURROGATES[case["surrogate"]](), step_mode=case["step_mode"],
                  backend=backend, store_v_seq=case["store_v_seq"])
    if case["node"] == "LIFNode":
        kwargs.update(tau=1.6, decay_input=case["decay_input"])
    elif case["node"] == "ParametricLIFNode":
        kwargs.update(init_tau=2.5, decay_input=case["decay_input"])
    node = NODES[case["node"]](**kwargs)
    node.train(case["training"])
    return node


def _run_pair(ours, theirs, x, x_ref, sync_state):
    """Run both nodes; ``sync_state``: hand our stored state (rounded to the input dtype) to the
    fp32 reference node wherever a call ends, as the state we keep between calls is rounded.
    The value is replaced, the reference's own gradient path kept (rounding has derivative 1)."""
    if ours.step_mode == "m":
        y, y_ref = ours(x), theirs(x_ref)
        if sync_state:
            theirs.v = _with_value(theirs.v, ours.v)
        return y, y_ref
    ys, ys_ref = [], []
    for x_t, x_ref_t in zip(x, x_ref):
        ys.append(ours(x_t))
        ys_ref.append(theirs(x_ref_t))
        assert torch.equal(ours.v, theirs.v.to(x.dtype))
        if sync_state:
            theirs.v = _with_value(theirs.v, ours.v)
    return torch.stack(ys), torch.stack(ys_ref)


def _with_value(v_ref, v):
    return v.to(v_ref.dtype).detach() + (v_ref - v_ref.detach())  # exact value, gradient 1


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_matches_torch_backend(case):
    """fp32/fp64: the torch backend in the same dtype, bit for bit in the forward pass. fp16/bf16:
    the kernels keep an fp32 state, so the torch backend runs in fp32 on the same inputs and we
    must equal its results rounded once to the input dtype."""
    g = torch.Generator().manual_seed(stable_seed(case))
    dtype, acc = case["dtype"], STATE_DTYPE[case["dtype"]]
    ours, theirs = _make(case, "temporal_fusion"), _make(case, "torch")
    grads_on = case["training"]
    inputs = []
    loss, loss_ref = 0.0, 0.0
    with torch.set_grad_enabled(grads_on):
        for call in range(case["calls"]):
            x = (torch.randn(9, 2, 13, generator=g) * 0.9 + 0.35).to(dtype).requires_grad_(grads_on)
            x_ref = x.detach().to(acc).requires_grad_(grads_on)
            inputs.append((x, x_ref))
            if acc != dtype and isinstance(theirs.v, float):  # our initial state is v_reset in x's dtype
                theirs.v = torch.full(x.shape[1:], theirs.v, dtype=dtype).to(acc)
            y, y_ref = _run_pair(ours, theirs, x, x_ref, sync_state=acc != dtype)
            assert y.dtype == ours.v.dtype == dtype
            assert torch.equal(y.to(acc), y_ref), f"spikes differ in call {call}"
            assert torch.equal(ours.v, theirs.v.to(dtype)), f"v differs after call {call}"
            if case["store_v_seq"] and case["step_mode"] == "m":
                assert torch.equal(ours.v_seq, theirs.v_seq.to(dtype))
            gy = torch.randn(y.shape, generator=g).to(dtype).to(acc)
            loss = loss + (y.to(acc) * gy).sum()
            loss_ref = loss_ref + (y_ref * gy).sum()
        if not grads_on:
            return
        loss = loss + ours.v.to(acc).square().sum()
        loss_ref = loss_ref + theirs.v.square().sum()
    params = [p[0] for p in inputs] + list(ours.parameters())
    params_ref = [p[1] for p in inputs] + list(theirs.parameters())
    for a, b, name in zip(torch.autograd.grad(loss, params), torch.autograd.grad(loss_ref, params_ref),
                          [f"x{i}" for i in range(len(inputs))] + ["w"]):
        # w is an fp32 parameter: its gradient is accumulated in fp32 whatever the input dtype
        assert_grad_close(a, b, torch.float32 if name == "w" and dtype == torch.float64 else dtype, f"grad {name}")


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
    node = neuron.LIFNode(step_mode="m", backend="temporal_fusion")
    node(torch.rand(4, 3, 5))
    with pytest.raises(ValueError, match="reset_net"):
        node(torch.rand(4, 3, 6))
    functional.reset_net(node)
    assert node.v == 0.0
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
    assert opts["kind"] == "plif" and opts["w"] is node.w and opts["decay_input"] is False
    assert opts["v_threshold"] == 0.7 and opts["v_reset"] is None and opts["detach_reset"] is True


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
