"""One neuron node against another on a grid case (tests/_grid.py), as test_spikingjelly.py (the
torch backend) and test_frontends_spikingjelly2.py (SpikingJelly 2's own path) compare them: the
case's consecutive calls on the same inputs, ours in the case's dtype and theirs in the state
dtype; spikes equal after every call, states and v_seq compared by the caller's rules, and in
training the gradients of a loss over the outputs and the final states; and truncated BPTT."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from spikingjelly.activation_based import functional

from sj_temporal_fusion.neurons import REGISTRY

from _grid import stable_seed
from _models import MODELS
from conftest import STATE_DTYPE


def run(node, x):
    """The node over x's time steps in its own step mode."""
    if node.step_mode == "m":
        return node(x)
    return torch.stack([node(x_t) for x_t in x])


def compare_calls(case: dict, ours, theirs, states: Callable, compare_state: Callable,
                  compare_v_seq: Callable) -> Optional[list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """Runs the case's calls on both nodes; after each, ``compare_state(name, our state, their state, call)``
    per state (``states(node)`` lists them in the model's order) and, with store_v_seq,
    ``compare_v_seq(ours, theirs)``. Returns [(name, our gradient, their gradient)] for the inputs
    x0, x1, ... and our learnable parameters in training, None in eval."""
    g = torch.Generator().manual_seed(stable_seed(case))
    mc = MODELS[case["model"]]
    dtype, acc = case["dtype"], STATE_DTYPE[case["dtype"]]
    training = case["training"]
    inputs, loss, loss_ref = [], 0.0, 0.0
    with torch.set_grad_enabled(training):
        for call in range(case["calls"]):
            x = (torch.randn(9, 2, 13, generator=g) * mc.x_scale + mc.x_shift).to(dtype).requires_grad_(training)
            x_ref = x.detach().to(acc).requires_grad_(training)
            inputs.append((x, x_ref))
            y, y_ref = run(ours, x), run(theirs, x_ref)
            assert y.dtype == dtype
            assert torch.equal(y.to(acc), y_ref), f"spikes differ in call {call}"
            for name, a, b in zip(REGISTRY[case["model"]].states, states(ours), states(theirs)):
                assert a.dtype == acc, f"{name} is not kept in the state dtype"
                compare_state(name, a, b, call)
            if case["store_v_seq"]:
                compare_v_seq(ours, theirs)
            gy = torch.randn(y.shape, generator=g).to(dtype).to(acc)
            loss = loss + (y.to(acc) * gy).sum()
            loss_ref = loss_ref + (y_ref * gy).sum()
        if not training:
            return None
        loss = loss + sum(s.to(acc).square().sum() for s in states(ours))
        loss_ref = loss_ref + sum(s.to(acc).square().sum() for s in states(theirs))
    params = [p[0] for p in inputs] + list(ours.parameters())
    params_ref = [p[1] for p in inputs] + list(theirs.parameters())
    names = [f"x{i}" for i in range(len(inputs))] + [n for n, _ in ours.named_parameters()]
    return list(zip(names, torch.autograd.grad(loss, params), torch.autograd.grad(loss_ref, params_ref)))


def detach_net_gradients(model: str, make_node: Callable) -> list[torch.Tensor]:
    """Truncated BPTT (online training): three chunks of inputs through ``make_node(options)`` (the
    model's first grid options) with functional.detach_net between them, so each chunk's backward
    stops at the state it started from. Returns the chunks' gradients, then the parameters'."""
    mc = MODELS[model]
    node = make_node(dict(mc.fixed, **{k: v[0] for k, v in mc.grid.items()}))
    g = torch.Generator().manual_seed(4)
    xs = [(torch.randn(6, 3, 10, generator=g) * mc.x_scale + mc.x_shift).requires_grad_() for _ in range(3)]
    for x in xs:
        (node(x).sum() + node.v.sum()).backward()
        functional.detach_net(node)
    return [x.grad for x in xs] + [p.grad for p in node.parameters()]
