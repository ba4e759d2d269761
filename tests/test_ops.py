"""The torch.library layer: opcheck on every op of every model, torch.compile without graph breaks,
and proof that the fused kernels (not a fallback) run inside a real network."""
import pytest
import torch
from spikingjelly.activation_based import neuron

import sj_temporal_fusion
from sj_temporal_fusion import ops
from sj_temporal_fusion.functional import lif_multi_step, parameter_tensor
from sj_temporal_fusion.neurons import REGISTRY
from sj_temporal_fusion.surrogate import DEFAULT_ID
from sj_temporal_fusion.variants import backward_variant, forward_variant

from _grid import spiking_resnet18
from _models import MODELS


def _forward_args(model, dtype=torch.float32, T=19, N=(7, 10), store_v_seq=True, save=True, learnable=True):
    m, mc = REGISTRY[model], MODELS[model]
    o = dict(m.defaults, **mc.fixed, **{k: v[-1] for k, v in mc.grid.items()})
    o.update(mc.learnable(o))
    acc = ops.state_dtype(dtype)
    params, mask = parameter_tensor(m.param_values(o), acc, torch.device("cpu"))
    params = params.detach().requires_grad_(learnable)
    x = (torch.randn(T, *N, dtype=dtype) * mc.x_scale + mc.x_shift).requires_grad_()
    v0 = torch.zeros(N, dtype=acc, requires_grad=True)
    aux = torch.zeros(N, dtype=acc, requires_grad=True) if m.num_states == 2 else torch.empty(0, dtype=acc)
    return (x, v0, aux, params, model, m.forward_form(o), m.form(o), DEFAULT_ID, 4.0, 0.0,
            mask if learnable else 0, store_v_seq, save)


def kernel_variants(item):
    """The host variants of ``test_opcheck_neuron_forward`` (tests/_prebuild.py): opcheck runs
    the forward and, through autograd, the backward of ``_forward_args``."""
    if item.originalname != "test_opcheck_neuron_forward":
        return None
    model, dtype = item.callspec.params["model"], item.callspec.params["dtype"]
    m = REGISTRY[model]
    args = dict(zip(ops.input_names(ops.neuron_forward._opoverload._schema), _forward_args(model, dtype, T=1, N=(1,))))
    return [forward_variant(m, dtype, args["form"]),
            backward_variant(m, dtype, args["surrogate_id"], args["backward_form"], args["param_grad_mask"] != 0)]


@pytest.mark.parametrize("model", list(REGISTRY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("store_v_seq", [False, True])
def test_opcheck_neuron_forward(model, dtype, store_v_seq):
    torch.library.opcheck(ops.neuron_forward, _forward_args(model, dtype, store_v_seq=store_v_seq))


def test_opcheck_neuron_forward_inference():
    x, v0, aux, params, *rest = _forward_args("lif", save=False, learnable=False)
    torch.library.opcheck(ops.neuron_forward, (x.detach(), v0.detach(), aux, params, *rest))


@pytest.mark.parametrize("model", list(REGISTRY))
@pytest.mark.parametrize("with_state_grads", [False, True])
def test_opcheck_neuron_backward(model, with_state_grads):
    args = _forward_args(model)
    spike, v_last, aux_last, v_seq, checkpoints = ops.neuron_forward(*args)
    x, params = args[0].detach(), args[3].detach()
    g = lambda t: torch.randn_like(t) if with_state_grads and t.numel() else None
    torch.library.opcheck(ops.neuron_backward, (
        torch.randn_like(x), g(v_seq), g(v_last), g(aux_last), x, checkpoints, params, model, args[6], DEFAULT_ID,
        4.0, 0.0, (1 << params.shape[0]) - 1, True, REGISTRY[model].shardable))


@pytest.mark.parametrize("model", list(REGISTRY))
def test_a_one_row_spike_gradient_is_read_at_every_step(model):
    """grad_spike of one step's shape (the same gradient at every step) gives exactly what that
    row repeated T times gives, in the plain variant and in time sharding's (carry factors, no grad_x);
    and opcheck passes with it."""
    args = _forward_args(model)
    _, _, _, _, checkpoints = ops.neuron_forward(*args)
    x, params = args[0].detach(), args[3].detach()
    row = torch.randn_like(x[0])
    shard = REGISTRY[model].shardable
    for want_grad_x, want_a in {(True, False), (not shard, shard)}:
        call = lambda g: ops.neuron_backward(g, None, None, None, x, checkpoints, params, model, args[6],
                                             DEFAULT_ID, 4.0, 0.0, (1 << params.shape[0]) - 1, want_grad_x, want_a)
        for got, want in zip(call(row), call(row.expand_as(x).contiguous())):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.library.opcheck(ops.neuron_backward, (
        row, None, None, None, x, checkpoints, params, model, args[6], DEFAULT_ID, 4.0, 0.0, 1, True, False))


@pytest.mark.parametrize("loss", ["sum", "mean", "sum_over_time", "transposed", "state_only"])
def test_gradients_as_autograd_hands_them_equal_dense_ones(loss):
    """Autograd's gradient of spike in the layout it arrives in (expanded over time by sum(),
    dense from mean(), transposed, or none when only the state is used) gives exactly what the same gradient
    made dense and contiguous gives."""
    w = torch.tensor(0.2, requires_grad=True)
    x = torch.randn(9, 4, 6, requires_grad=True)
    weights = torch.randn(4, 6)
    losses = {"sum": lambda s, v: s.sum(), "mean": lambda s, v: s.mean(),
              "sum_over_time": lambda s, v: (s.sum(0) * weights).sum(),
              "transposed": lambda s, v: (s.transpose(0, 1) * torch.arange(9.0).view(1, 9, 1)).sum(),
              "state_only": lambda s, v: v.square().sum()}
    spike, v, _ = lif_multi_step(x, kind="plif", w=w, v_threshold=0.4)
    spike_probe, v_probe = spike.detach().requires_grad_(), v.detach().requires_grad_()
    grad_spike, grad_v = torch.autograd.grad(losses[loss](spike_probe, v_probe), [spike_probe, v_probe],
                                             allow_unused=True, materialize_grads=True)
    if loss in ("sum", "sum_over_time"):
        assert grad_spike.stride(0) == 0  # the layouts this test is about
    if loss == "transposed":
        assert not grad_spike.is_contiguous()
    got = torch.autograd.grad(losses[loss](spike, v), [x, w], retain_graph=True)
    want = torch.autograd.grad([spike, v], [x, w], [grad_spike.contiguous().clone(), grad_v])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["shape", "dtype", "strides"])
def test_a_spike_gradient_the_kernel_cannot_read_is_refused(bad):
    args = _forward_args("lif")
    _, _, _, _, checkpoints = ops.neuron_forward(*args)
    x, params = args[0].detach(), args[3].detach()
    grad = {"shape": torch.randn(x.shape[0], 3), "dtype": torch.randn_like(x, dtype=torch.float64),
            "strides": torch.randn(*x.shape[1:], x.shape[0]).movedim(-1, 0)}[bad]
    with pytest.raises(ValueError, match=r"grad_spike must be a contiguous torch.float32 tensor .*spike_gradient"):
        ops.neuron_backward(grad, None, None, None, x, checkpoints, params, "lif", args[6], DEFAULT_ID, 4.0, 0.0,
                            0, True, False)


@pytest.mark.parametrize("model", [name for name, m in REGISTRY.items() if m.shardable])
def test_opcheck_neuron_fixup(model):
    x, v0, aux, params, _, form, *_ = _forward_args(model, learnable=False)
    x = x.detach().reshape(x.shape[0], -1)
    spike, v_last, _, v_seq, checkpoints = ops.neuron_forward(
        x, v0.detach().reshape(-1), aux, params, model, form, form, DEFAULT_ID, 4.0, 0.0, 0, True, True)
    torch.library.opcheck(ops.neuron_fixup, (x, torch.full_like(v_last, 0.3), checkpoints, spike, v_seq, v_last,
                                            params, model, form))


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
    launches = {"neuron_forward": 0, "neuron_backward": 0}
    original = ops.launch

    def counting(expression, x, args):
        launches[expression.split("<")[0]] += 1
        return original(expression, x, args)

    def no_fallback(self, *args):
        raise AssertionError("SpikingJelly's own neuronal_charge ran: the fused path was bypassed")

    monkeypatch.setattr(ops, "launch", counting)
    monkeypatch.setattr(neuron.LIFNode, "neuronal_charge", no_fallback)
    net = spiking_resnet18("temporal_fusion")
    n_nodes = sum(isinstance(m, neuron.LIFNode) for m in net.modules())
    assert n_nodes == 17
    x = torch.rand(3, 2, 3, 32, 32)
    net(x).mean().backward()
    assert launches == {"neuron_forward": n_nodes, "neuron_backward": n_nodes}


def test_import_registers_and_unregister_restores():
    node = neuron.LIFNode(step_mode="m")
    assert "temporal_fusion" in node.supported_backends
    sj_temporal_fusion.register()  # idempotent
    assert node.supported_backends.count("temporal_fusion") == 1
    sj_temporal_fusion.unregister()
    try:
        assert "temporal_fusion" not in node.supported_backends
        with pytest.raises(NotImplementedError):
            neuron.LIFNode(backend="temporal_fusion", step_mode="m")
    finally:
        sj_temporal_fusion.register()
    assert neuron.LIFNode(backend="temporal_fusion", step_mode="m").backend == "temporal_fusion"


@pytest.mark.parametrize("model", list(REGISTRY))
def test_param_grad_buffer_holds_only_the_learnable_rows(model):
    """One (N,) row per learnable entry, in entry order, each equal to that entry's row when
    every entry is learned: an unlearned entry takes no memory."""
    args = _forward_args(model)
    _, _, _, _, checkpoints = ops.neuron_forward(*args)
    x, params = args[0].detach(), args[3].detach()
    n_params, n = params.shape[0], x[0].numel()
    grad_spike = torch.randn_like(x)

    def grads(mask):
        return ops.neuron_backward(grad_spike, None, None, None, x, checkpoints, params, model, args[6], DEFAULT_ID,
                                   4.0, 0.0, mask, True, False)[3]

    every = grads((1 << n_params) - 1)
    assert every.shape == (n_params, n)
    for mask in {1 << (n_params - 1), 1 | 1 << (n_params - 1)}:
        rows = [i for i in range(n_params) if mask >> i & 1]
        got = grads(mask)
        assert got.shape == (len(rows), n) == (ops.param_grad_rows(mask, n_params), n)
        assert torch.equal(got, every[rows])


class _RecordBatchNormBackward(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.native_batch_norm_backward.default:
            self.calls.append(args)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("needs", [(False, False), (True, True), (True, False)])
def test_folded_affine_backward_passes_defined_save_tensors(needs):
    """The folded BatchNorm's backward (dL/dy of y = x * scale[c] + shift[c]) hands
    native_batch_norm_backward defined save_mean / save_invstd (CUDA asserts them outside its fused
    path: eval without weight/bias gradients, or past 32-bit indexing) and equals autograd in fp64."""
    T, B, C, inner = 3, 2, 5, 7
    x = torch.randn(T, B, C, inner, dtype=torch.float64)
    scale = torch.randn(C, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(C, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn_like(x)
    mode = _RecordBatchNormBackward()
    with mode:
        grad_x, grad_scale, grad_shift = ops._affine_backward(grad_y, x, scale.detach(), inner, C, needs)
    assert len(mode.calls) == 1
    save_mean, save_invstd = mode.calls[0][5], mode.calls[0][6]
    assert isinstance(save_mean, torch.Tensor) and isinstance(save_invstd, torch.Tensor)
    assert torch.equal(save_mean, torch.zeros(C, dtype=torch.float64))
    assert torch.equal(save_invstd, torch.ones(C, dtype=torch.float64))
    xr = x.clone().requires_grad_()
    y = xr * scale.view(1, 1, C, 1) + shift.view(1, 1, C, 1)
    ex, es, eb = torch.autograd.grad(y, [xr, scale, shift], grad_y)
    torch.testing.assert_close(grad_x, ex, rtol=1e-13, atol=1e-13)
    for got, expected, need in ((grad_scale, es, needs[0]), (grad_shift, eb, needs[1])):
        if need:
            torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
        else:
            assert got is None
