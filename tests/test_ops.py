"""The torch.library layer: opcheck on every op, torch.compile without graph breaks, and proof
that the fused kernels (not a fallback) run inside a real network."""
import pytest
import torch
from spikingjelly.activation_based import neuron

import sj_temporal_fusion
from sj_temporal_fusion import ops
from sj_temporal_fusion.functional import lif_multi_step

from _grid import spiking_resnet18


def _forward_args(kind=ops.Kind.LIF, dtype=torch.float32, T=19, N=70, store_v_seq=True, save=True, plif_k=None):
    x = torch.randn(T, N, dtype=dtype, requires_grad=True)
    v0 = torch.zeros(N, dtype=dtype, requires_grad=True)
    return (x, v0, plif_k, 1.5, 1 - 1 / 1.5, 0.4, 0.0, int(kind), True, True, False, 2, 4.0, 0.0,
            store_v_seq, save)


@pytest.mark.parametrize("kind", list(ops.Kind))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("store_v_seq", [False, True])
def test_opcheck_lif_forward(kind, dtype, store_v_seq):
    k = torch.tensor([0.4, 0.6], dtype=ops.state_dtype(dtype), requires_grad=True) if kind == ops.Kind.PLIF else None
    torch.library.opcheck(ops.lif_forward, _forward_args(kind, dtype, store_v_seq=store_v_seq, plif_k=k))


def test_opcheck_lif_forward_inference():
    x, v0, *rest = _forward_args(save=False)
    torch.library.opcheck(ops.lif_forward, (x.detach(), v0.detach(), *rest))


@pytest.mark.parametrize("with_v_grads", [False, True])
def test_opcheck_lif_backward(with_v_grads):
    args = _forward_args()
    spike, v_last, v_seq, checkpoints = ops.lif_forward(*args)
    x = args[0].detach()
    grad_spike = torch.randn_like(x)
    grad_v_seq = torch.randn_like(x) if with_v_grads else None
    grad_v_last = torch.randn(x.shape[1]) if with_v_grads else None
    k = torch.tensor([0.4, 0.6])
    torch.library.opcheck(ops.lif_backward, (grad_spike, grad_v_seq, grad_v_last, x, checkpoints, k, 1.5,
                                             1 - 1 / 1.5, 0.4, 0.0, int(ops.Kind.PLIF), True, True, False,
                                             2, 4.0, 0.0, True))


def test_torch_compile_fullgraph():
    """A compiled call traces through the custom op and its autograd without graph breaks."""
    w = torch.tensor(0.2, requires_grad=True)

    def step(x):
        spike, v, v_seq = lif_multi_step(x, kind="plif", w=w, v_threshold=0.4, store_v_seq=True)
        return spike.mean() + v_seq.square().mean() + v.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(21, 4, 9, requires_grad=True)
    out_eager = step(x)
    g_eager = torch.autograd.grad(out_eager, [x, w])
    out = compiled(x)
    g = torch.autograd.grad(out, [x, w])
    torch.testing.assert_close(out, out_eager, rtol=0, atol=0)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


def test_fused_kernels_run_in_a_network(monkeypatch):
    """Count launches: one fused forward and one fused backward per LIF layer, per call; and
    SpikingJelly's own per-step dynamics never run (no silent fallback to the torch backend)."""
    launches = {"lif_forward": 0, "lif_backward": 0}
    original = ops._launch

    def counting(kernel, x, surrogate_id, args):
        launches[kernel] += 1
        return original(kernel, x, surrogate_id, args)

    def no_fallback(self, *args):
        raise AssertionError("SpikingJelly's own neuronal_charge ran: the fused path was bypassed")

    monkeypatch.setattr(ops, "_launch", counting)
    monkeypatch.setattr(neuron.LIFNode, "neuronal_charge", no_fallback)
    net = spiking_resnet18("temporal_fusion")
    n_nodes = sum(isinstance(m, neuron.LIFNode) for m in net.modules())
    assert n_nodes == 17
    x = torch.rand(3, 2, 3, 32, 32)
    net(x).mean().backward()
    assert launches == {"lif_forward": n_nodes, "lif_backward": n_nodes}


def test_import_registers_and_unregister_restores():
    node = neuron.LIFNode(step_mode="m")
    assert "temporal_fusion" in node.supported_backends
    sj_temporal_fusion.register()  # idempotent
    assert node.supported_backends.count("temporal_fusion") == 1
    original_forward = neuron.LIFNode.multi_step_forward
    sj_temporal_fusion.unregister()
    try:
        assert "temporal_fusion" not in node.supported_backends
        assert neuron.LIFNode.multi_step_forward is not original_forward
        with pytest.raises(NotImplementedError):
            neuron.LIFNode(backend="temporal_fusion", step_mode="m")
    finally:
        sj_temporal_fusion.register()
    assert neuron.LIFNode(backend="temporal_fusion", step_mode="m").backend == "temporal_fusion"
