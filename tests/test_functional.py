"""neuron_multi_step (the fused kernels, host build) against the pure-PyTorch reference, for every
registered model over its option grid x surrogates x dtypes x v_seq x T x consecutive calls. The
kernels keep the state in fp32 (fp64 for fp64), within a call and between calls, so the reference
runs in that precision on the same inputs: spikes and states must match bit for bit (to rounding
for EIF, whose exp rounds differently in libm and PyTorch), gradients to rounding."""
import pytest
import torch
from spikingjelly.activation_based import surrogate as S

from sj_temporal_fusion import _host, ops
from sj_temporal_fusion.functional import lif_multi_step, neuron_multi_step
from sj_temporal_fusion.neurons import REGISTRY
from sj_temporal_fusion.reference import lif_reference, neuron_reference

from _grid import DTYPES, SURROGATES, assert_grad_close, case_id, covering, stable_seed
from _models import MODELS
from _prebuild import call_variants
from conftest import STATE_DTYPE


def _grid(model):
    # EIF in fp64 only: in fp32 the host's vectorised expf (libmvec, up to 4 ulp) and PyTorch's exp
    # differ, and over tens of steps a neuron near the threshold may legitimately spike on one side
    # only; its fp32/fp16/bf16 runs are compared with SpikingJelly's in test_spikingjelly.
    dtypes = DTYPES if MODELS[model].exact else [torch.float64]
    factors = dict(MODELS[model].grid, surrogate=list(SURROGATES), dtype=dtypes, store_v_seq=[False, True],
                   T=[1, 7, 16, 33], calls=[1, 3])
    return [dict(model=model, **case) for case in covering(factors)]


GRID = [case for model in REGISTRY for case in _grid(model)]


def kernel_variants(item):
    """The host variants of a grid case (tests/_prebuild.py)."""
    case = item.callspec.params.get("case")
    if case is None or item.originalname not in ("test_matches_reference", "test_gpu_code_shape_matches_reference"):
        return None
    mc = MODELS[case["model"]]
    options = dict(mc.fixed, **{k: case[k] for k in mc.grid})
    learn = mc.learnable(options)
    names = call_variants(case["model"], case["dtype"], dict(options, **learn), SURROGATES[case["surrogate"]](),
                          param_grads=bool(learn))
    return [(name, item.originalname == "test_gpu_code_shape_matches_reference", False) for name in names]


def _inputs(mc, shape, dtype, generator, num_states):
    x = (torch.randn(shape, generator=generator) * mc.x_scale + mc.x_shift).to(dtype)
    z0 = tuple((torch.randn(shape[1:], generator=generator) * 0.2).to(STATE_DTYPE[dtype]) for _ in range(num_states))
    return x, z0


def _assert_state_equal(ours, ref, exact, what):
    if exact:
        assert torch.equal(ours, ref), f"{what} differs"
    else:
        # EIF: the host's vectorised expf (libmvec, up to 4 ulp) and PyTorch's differ, and the
        # exponential charge amplifies that over the steps; a sequence stored in fp16/bf16 may round
        # either way
        eps = max(torch.finfo(ours.dtype).eps, 1e-4)
        torch.testing.assert_close(ours, ref, rtol=8 * eps, atol=eps, msg=lambda m: f"{what}: {m}")


def run_case(case, emulate_gpu=False):
    g = torch.Generator().manual_seed(stable_seed(case))
    m, mc = REGISTRY[case["model"]], MODELS[case["model"]]
    dtype, acc = case["dtype"], STATE_DTYPE[case["dtype"]]
    options = dict(mc.fixed, **{k: case[k] for k in mc.grid})
    learn = mc.learnable(options)
    learn_ref = {k: v.detach().clone().requires_grad_() for k, v in learn.items()}
    sg = SURROGATES[case["surrogate"]]()
    exact = mc.exact
    xs, loss, loss_ref, z, z_ref = [], 0.0, 0.0, None, None
    for _ in range(case["calls"]):  # state (and its gradient) carried across calls
        x, z0 = _inputs(mc, (case["T"], 3, 41), dtype, g, m.num_states)  # 123 neurons: not a multiple of 64
        if z is None:
            z = tuple(t.requires_grad_() for t in z0)
            z_ref = tuple(t.detach().clone().requires_grad_() for t in z0)
            leaves = (z, z_ref)
        x.requires_grad_()
        x_ref = x.detach().to(acc).requires_grad_()
        xs.append((x, x_ref))
        spike, z, v_seq = neuron_multi_step(x, z, model=case["model"], surrogate_function=sg,
                                            store_v_seq=case["store_v_seq"], **options, **learn)
        spike_r, z_ref, v_seq_r = neuron_reference(x_ref, z_ref, model=case["model"], surrogate_function=sg,
                                                   store_v_seq=case["store_v_seq"], **options, **learn_ref)
        assert spike.dtype == dtype and all(t.dtype == acc for t in z)
        assert torch.equal(spike.to(acc), spike_r), "spikes differ"
        for k, (a, b) in enumerate(zip(z, z_ref)):
            _assert_state_equal(a, b, exact, f"final {m.states[k]}")
        g_spike = torch.randn(spike.shape, generator=g).to(dtype).to(acc)  # representable in dtype
        loss = loss + (spike.to(acc) * g_spike).sum()
        loss_ref = loss_ref + (spike_r * g_spike).sum()
        if case["store_v_seq"]:
            _assert_state_equal(v_seq, v_seq_r.to(dtype), exact, "v_seq")
            g_v = torch.randn(v_seq.shape, generator=g).to(dtype).to(acc)
            loss = loss + (v_seq.to(acc) * g_v).sum()
            loss_ref = loss_ref + (v_seq_r * g_v).sum()
        else:
            assert v_seq is None
    loss = loss + sum((t * (k + 1)).sum() for k, t in enumerate(z))
    loss_ref = loss_ref + sum((t * (k + 1)).sum() for k, t in enumerate(z_ref))
    params = [p for p, _ in xs] + list(leaves[0]) + list(learn.values())
    params_r = [p for _, p in xs] + list(leaves[1]) + list(learn_ref.values())
    names = [f"grad x (call {i})" for i in range(len(xs))] + [f"grad {s}_init" for s in m.states] + list(learn)
    for ours, ref, name in zip(torch.autograd.grad(loss, params), torch.autograd.grad(loss_ref, params_r), names):
        # learnable parameters are fp32 tensors: their gradients are rounded to fp32; EIF's forward
        # agrees to rounding only (above), so its gradients are compared at bf16's tolerance
        tol_dtype = torch.float32 if name in learn and dtype == torch.float64 else dtype
        assert_grad_close(ours, ref, tol_dtype if exact else torch.bfloat16, name)


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_matches_reference(case):
    run_case(case)


@pytest.mark.parametrize("case", [c for model in REGISTRY for c in _grid(model)[:4]], ids=case_id)
def test_gpu_code_shape_matches_reference(case):
    """The GPU build's loop shapes (lanes blockDim apart, unrolled guarded chunk loops, x loaded a
    chunk ahead), compiled for the CPU (TF_EMULATE_GPU): the code CI cannot run on a GPU, run here."""
    with _host.emulate_gpu_shape():
        run_case(case)


@pytest.mark.parametrize("model", list(REGISTRY))
def test_gradcheck_fp64(model):
    """Numerical gradients of the fp64 op. With detach_reset the map x -> state is differentiable
    away from the threshold, so finite differences check the backward kernel's chunked recompute,
    carry, the initial state's gradient and the learnable parameters' (T = 37 crosses two
    checkpoints)."""
    m, mc = REGISTRY[model], MODELS[model]
    g = torch.Generator().manual_seed(7)
    options = dict(mc.fixed, **{k: v[0] for k, v in mc.grid.items()})
    options["detach_reset"] = True
    if model == "izhikevich":  # its hard reset's s * v_reset and w's jump b * s use the undetached spike
        options.update(v_reset=0.0, b=0.0)
    if model == "lif":
        options["kind"] = "plif"
    learn = {k: v.detach().double().requires_grad_() for k, v in mc.learnable(options).items()}
    threshold = torch.tensor(float(options.pop("v_threshold")), dtype=torch.float64, requires_grad=True)
    x = (torch.randn(37, 9, generator=g, dtype=torch.float64) * mc.x_scale + mc.x_shift).requires_grad_()
    z0 = tuple((torch.randn(9, generator=g, dtype=torch.float64) * 0.2).requires_grad_() for _ in m.states)
    names = list(learn)

    def run(x, threshold, *rest):
        z, extra = rest[:len(z0)], dict(zip(names, rest[len(z0):]))
        spike, z, v_seq = neuron_multi_step(x, z, model=model, v_threshold=threshold, store_v_seq=True,
                                            **options, **extra)
        assert spike.sum() > 0  # spikes do happen, so resets are exercised
        return (*z, v_seq)

    assert torch.autograd.gradcheck(run, (x, threshold, *z0, *learn.values()), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_reference_gradcheck_fp64():
    """The oracle itself is differentiable where it should be: same check on the reference."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(20, 5, generator=g, dtype=torch.float64) * 0.8 + 0.3).requires_grad_()
    fn = lambda x: lif_reference(x, kind="lif", tau=1.8, v_threshold=0.5, detach_reset=True)[1]
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("model", list(REGISTRY))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_any_split_gives_one_call(model, dtype):
    """The state is carried between calls at the kernels' precision, so one call over 16 steps,
    two calls over 8 and a loop of single steps give the same spikes and state, bit for bit."""
    m, mc = REGISTRY[model], MODELS[model]
    g = torch.Generator().manual_seed(11)
    options = dict(mc.fixed, **{k: v[0] for k, v in mc.grid.items()})
    x = (torch.randn(16, 4096, generator=g) * mc.x_scale + mc.x_shift).to(dtype)
    runs = []
    for splits in ([16], [8, 8], [1] * 16):
        z, spikes, t = None, [], 0
        for n in splits:
            spike, z, _ = neuron_multi_step(x[t:t + n], z, model=model, **options, **mc.learnable(options))
            spikes.append(spike)
            t += n
        runs.append((torch.cat(spikes), z))
    for spikes, z in runs[1:]:
        assert torch.equal(spikes, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(z, runs[0][1]))


def test_non_contiguous_input():
    x = torch.randn(6, 40, 7).transpose(1, 2)  # (6, 7, 40), not contiguous
    assert not x.is_contiguous()
    spike, v, _ = lif_multi_step(x, tau=1.5, v_threshold=0.5)
    spike_c, v_c, _ = lif_multi_step(x.contiguous(), tau=1.5, v_threshold=0.5)
    assert torch.equal(spike, spike_c) and torch.equal(v, v_c)


@pytest.mark.parametrize("kind", ["if", "lif"])
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_nan_and_inf_propagate_as_reference(kind, v_reset):
    x = torch.randn(8, 6) * 0.5
    x[1, 0], x[2, 1], x[3, 2], x[0, 3] = float("nan"), float("inf"), float("-inf"), float("inf")
    options = dict(kind=kind, tau=1.5, v_threshold=0.4, v_reset=v_reset, store_v_seq=True)
    spike, v, v_seq = lif_multi_step(x, **options)
    spike_r, v_r, v_seq_r = lif_reference(x, **options)
    torch.testing.assert_close(spike, spike_r, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(v_seq, v_seq_r, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(v_seq[:, 0]).any() and not torch.isfinite(v_seq[:, 1]).all()


def test_large_T_and_odd_N():
    x = torch.randn(129, 1000003 // 1000) * 0.6 + 0.4  # T = 129 (9 checkpoints), N = 1000
    x.requires_grad_()
    spike, v, _ = lif_multi_step(x, tau=1.25, decay_input=False, v_threshold=0.3)
    spike_r, v_r, _ = lif_reference(x, tau=1.25, decay_input=False, v_threshold=0.3)
    assert torch.equal(spike, spike_r) and torch.equal(v, v_r)
    gx, = torch.autograd.grad(spike.sum(), x)
    gx_r, = torch.autograd.grad(spike_r.sum(), x)
    assert_grad_close(gx, gx_r, torch.float32, "grad x")


class _MySurrogate(S.SurrogateFunctionBase):
    def __init__(self):
        super().__init__(alpha=1.0)


@pytest.mark.parametrize("bad, error, match", [
    (dict(x=torch.ones(3, 4, dtype=torch.int32)), TypeError, "float16, bfloat16, float32 or float64"),
    (dict(x=torch.ones(3, 4, dtype=torch.bool)), TypeError, "torch.bool"),
    (dict(x=torch.ones(0, 4)), ValueError, "T >= 1"),
    (dict(x=torch.tensor(1.0)), ValueError, r"shape \(T, \*\)"),
    (dict(v_init=torch.zeros(5)), ValueError, "reset_net"),
    (dict(v_init=torch.zeros(4, device="meta")), ValueError, "move them to one device"),
    (dict(surrogate_function=_MySurrogate()), NotImplementedError, "_MySurrogate"),
    (dict(surrogate_function=S.Sigmoid(spiking=False)), NotImplementedError, "spiking=False"),
    (dict(kind="izhikevich"), ValueError, "kind must be 'if', 'lif' or 'plif'"),
    (dict(kind="plif"), ValueError, "learnable one-element tensor"),
    (dict(kind="plif", w=torch.zeros(3)), ValueError, r"w, the learnable one-element tensor.*shape|got tensor"),
    (dict(v_threshold=None), TypeError, "v_threshold must be a float"),
    (dict(v_threshold=torch.ones(4)), ValueError, "v_threshold is a tensor of shape .4.*per-channel"),
    (dict(tau=-1.0), ValueError, "tau must be a positive float, got -1.0"),
])
def test_bad_input_is_a_clear_error(bad, error, match):
    args = dict(x=torch.ones(3, 4), v_init=None)
    args.update({k: bad.pop(k) for k in list(bad) if k in args})
    with pytest.raises(error, match=match):
        lif_multi_step(args["x"], args["v_init"], **bad)


def test_unknown_model_and_option_are_clear_errors():
    with pytest.raises(ValueError, match="model must be one of"):
        neuron_multi_step(torch.ones(2, 3), model="hodgkin_huxley")
    with pytest.raises(TypeError, match="unknown.*'taw'"):
        neuron_multi_step(torch.ones(2, 3), model="qif", taw=2.0)
    with pytest.raises(ValueError, match="state must hold 2 tensors"):
        neuron_multi_step(torch.ones(2, 3), (torch.zeros(3),), model="izhikevich")


def test_missing_cupy_names_the_extra(monkeypatch):
    import sys
    from sj_temporal_fusion import _cuda
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'sj-temporal-fusion\[cuda13\]'"):
        _cuda.import_cupy()


def test_inference_saves_no_checkpoints(monkeypatch):
    """Without grad the forward kernel runs in its inference form (no checkpoint pointer)."""
    checkpoint_args = []
    original = ops.launch

    def spy(expression, x, args):
        if expression.startswith("neuron_forward"):
            checkpoint_args.append(args["checkpoints"])
        return original(expression, x, args)

    monkeypatch.setattr(ops, "launch", spy)
    x = torch.randn(20, 10, requires_grad=True)
    with torch.no_grad():
        lif_multi_step(x)
    lif_multi_step(x)
    assert checkpoint_args[0] is None
    assert checkpoint_args[1].shape == (2, 1, 10)  # ceil(20 / 16) checkpoints of 1 state x 10 neurons
