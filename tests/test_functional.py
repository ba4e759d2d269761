"""lif_multi_step (the fused kernels, host build) against the pure-PyTorch reference, over the
whole option grid. The kernels keep the state in fp32 (fp64 for fp64), so the reference runs in
that precision on the same inputs: spikes and v must match bit for bit, gradients to rounding."""
import pytest
import torch
from spikingjelly.activation_based import surrogate as S

from sj_temporal_fusion import ops
from sj_temporal_fusion.functional import lif_multi_step
from sj_temporal_fusion.reference import lif_reference

from _grid import DTYPES, RESETS, SURROGATES, assert_grad_close, case_id, covering, stable_seed
from conftest import STATE_DTYPE

GRID = covering(
    dict(kind=["if", "lif", "plif"], v_reset=RESETS, decay_input=[True, False],
         detach_reset=[False, True], surrogate=list(SURROGATES), dtype=DTYPES,
         store_v_seq=[False, True], T=[1, 7, 16, 33], calls=[1, 3]),
    # Full product of the dynamics options, where the formulas differ, in fp32 and fp64.
    plus=[dict(kind=k, v_reset=r, decay_input=d, detach_reset=dr, surrogate="Sigmoid", dtype=dt,
               store_v_seq=True, T=40, calls=2)
          for k in ["if", "lif", "plif"] for r in RESETS for d in [True, False]
          for dr in [False, True] for dt in [torch.float32, torch.float64]])


def _inputs(case, generator):
    shape = (case["T"], 3, 41)  # 123 neurons: not a multiple of the 64 host lanes
    x = (torch.randn(shape, generator=generator) * 0.9 + 0.35).to(case["dtype"])
    v0 = (torch.randn(shape[1:], generator=generator) * 0.3).to(case["dtype"])
    return x, v0


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_matches_reference(case):
    g = torch.Generator().manual_seed(stable_seed(case))
    dtype, acc = case["dtype"], STATE_DTYPE[case["dtype"]]
    options = dict(kind=case["kind"], tau=1.6, decay_input=case["decay_input"], v_threshold=0.45,
                   v_reset=case["v_reset"], detach_reset=case["detach_reset"],
                   surrogate_function=SURROGATES[case["surrogate"]](), store_v_seq=case["store_v_seq"])
    w = torch.tensor(-0.4, requires_grad=True)  # PLIF: sigmoid(w) = 0.40
    w_ref = w.detach().clone().requires_grad_()
    xs, loss, loss_ref = [], 0.0, 0.0
    v, v_ref = None, None
    for _ in range(case["calls"]):  # state (and its gradient) carried across calls
        x, v0 = _inputs(case, g)
        if v is None:
            v = v0.requires_grad_()
            v_ref = v.detach().to(acc).requires_grad_()
            leaves = (v, v_ref)
        x.requires_grad_()
        x_ref = x.detach().to(acc).requires_grad_()
        xs.append((x, x_ref))
        spike, v, v_seq = lif_multi_step(x, v, w=w, **options)
        spike_r, v_ref, v_seq_r = lif_reference(x_ref, v_ref, w=w_ref, **options)
        v_ref = v_ref.to(dtype).to(acc)  # the state between calls is stored in x's dtype
        assert spike.dtype == v.dtype == dtype
        assert torch.equal(spike.to(acc), spike_r), "spikes differ"
        assert torch.equal(v, v_ref.to(dtype)), "final v differs"
        # Upstream gradients representable in dtype, so both sides see the same numbers.
        g_spike = torch.randn(spike.shape, generator=g).to(dtype).to(acc)
        loss = loss + (spike.to(acc) * g_spike).sum()
        loss_ref = loss_ref + (spike_r * g_spike).sum()
        if case["store_v_seq"]:
            assert torch.equal(v_seq, v_seq_r.to(dtype)), "v_seq differs"
            g_v = torch.randn(v_seq.shape, generator=g).to(dtype).to(acc)
            loss = loss + (v_seq.to(acc) * g_v).sum()
            loss_ref = loss_ref + (v_seq_r * g_v).sum()
        else:
            assert v_seq is None
    loss = loss + v.to(acc).sum()
    loss_ref = loss_ref + v_ref.sum()
    params = [p for pair in xs for p in pair[:1]] + [leaves[0]] + ([w] if case["kind"] == "plif" else [])
    params_r = [p for pair in xs for p in pair[1:]] + [leaves[1]] + ([w_ref] if case["kind"] == "plif" else [])
    grads = torch.autograd.grad(loss, params)
    grads_r = torch.autograd.grad(loss_ref, params_r)
    names = [f"grad x (call {i})" for i in range(len(xs))] + ["grad v_init", "grad w"]
    for ours, ref, name in zip(grads, grads_r, names):
        assert_grad_close(ours, ref, dtype, name)


@pytest.mark.parametrize("kind", ["if", "lif", "plif"])
@pytest.mark.parametrize("v_reset", [-0.2, None])
def test_gradcheck_fp64(kind, v_reset):
    """Numerical gradients of the fp64 op. With detach_reset the map x -> v is differentiable
    away from the threshold, so finite differences check the backward kernel's chunked recompute,
    carry, grad_v_init and PLIF's grad w (T = 37 crosses two checkpoint boundaries)."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(37, 9, generator=g, dtype=torch.float64) * 0.8 + 0.3).requires_grad_()
    v0 = (torch.randn(9, generator=g, dtype=torch.float64) * 0.2).requires_grad_()
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def run(x, v0, w):
        spike, v, v_seq = lif_multi_step(x, v0, kind=kind, tau=1.8, w=w, v_threshold=0.5, v_reset=v_reset,
                                         detach_reset=True, store_v_seq=True)
        assert spike.sum() > 0  # spikes do happen, so resets are exercised
        return v, v_seq

    inputs = (x, v0, w) if kind == "plif" else (x, v0)
    fn = run if kind == "plif" else (lambda x, v0: run(x, v0, w))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_reference_gradcheck_fp64():
    """The oracle itself is differentiable where it should be: same check on the reference."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(20, 5, generator=g, dtype=torch.float64) * 0.8 + 0.3).requires_grad_()
    fn = lambda x: lif_reference(x, kind="lif", tau=1.8, v_threshold=0.5, detach_reset=True)[1]
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


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
    (dict(v_init=torch.zeros(5)), ValueError, "reset_net"),
    (dict(v_init=torch.zeros(4, device="meta")), ValueError, "move them to one device"),
    (dict(surrogate_function=_MySurrogate()), NotImplementedError, "_MySurrogate"),
    (dict(surrogate_function=S.Sigmoid(spiking=False)), NotImplementedError, "spiking=False"),
    (dict(kind="izhikevich"), ValueError, "kind must be one of"),
    (dict(kind="plif"), ValueError, "learnable w"),
])
def test_bad_input_is_a_clear_error(bad, error, match):
    args = dict(x=torch.ones(3, 4), v_init=None)
    args.update({k: bad.pop(k) for k in list(bad) if k in args})
    with pytest.raises(error, match=match):
        lif_multi_step(args["x"], args["v_init"], **bad)


def test_missing_cupy_names_the_extra(monkeypatch):
    import sys
    from sj_temporal_fusion import _cuda
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'sj-temporal-fusion\[cuda13\]'"):
        _cuda.import_cupy()


def test_inference_saves_no_checkpoints(monkeypatch):
    """Without grad the forward kernel runs in its inference form (no checkpoint pointer)."""
    checkpoint_args = []
    original = ops._launch

    def spy(kernel, x, surrogate_id, args):
        if kernel == "lif_forward":
            checkpoint_args.append(args[5])  # ("ptr", checkpoints or None)
        return original(kernel, x, surrogate_id, args)

    monkeypatch.setattr(ops, "_launch", spy)
    x = torch.randn(20, 10, requires_grad=True)
    with torch.no_grad():
        lif_multi_step(x)
    lif_multi_step(x)
    assert checkpoint_args[0] == ("ptr", None)
    assert checkpoint_args[1][1].shape == (2, 10)  # ceil(20 / 16) checkpoints of 10 neurons
