"""The time-sharding kernels (csrc/temporal.cu's neuron_forward, neuron_fixup and neuron_backward
with its carry factor) in one process, host build: the speculative forward, the fix-up and the
affine backward, against the one-device kernels (functional.neuron_multi_step), bit for bit where
the algorithm promises it, for every model with one state variable."""
import pytest
import torch

import sj_temporal_fusion  # noqa: F401
from sj_temporal_fusion import ops
from sj_temporal_fusion.distributed import kernels as K
from sj_temporal_fusion.distributed.scan import compose, scan_rounds
from sj_temporal_fusion.functional import lif_multi_step, neuron_multi_step
from sj_temporal_fusion.neurons import REGISTRY
from sj_temporal_fusion.variants import backward_variant, fixup_variant, forward_variant

from _grid import DTYPES, RESETS, SHARD_KINDS as KINDS, grad_tolerance, shard_group_options
from _models import MODELS
from _prebuild import call_variants


def _setup(kind, dtype, v_reset, T=41, N=263, seed=0, **overrides):
    """Inputs and options of one kind x reset x dtype; the options that pick a kernel variant are
    the parity cases' for the same group (shard_group_options), so the two share variants."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, N, generator=g) * 0.7 + 0.3).to(dtype)
    w = torch.tensor(-0.4)
    group = shard_group_options(kind, v_reset, dtype)
    options = dict(kind=kind, tau=1.7, decay_input=group["decay_input"], v_threshold=0.4, v_reset=v_reset,
                   detach_reset=group["detach_reset"], surrogate_function=group["surrogate"])
    options.update(overrides)
    spec = K.NeuronSpec.from_options(model="lif", w=w, **options)
    params = K.neuron_parameters(dict(model="lif", w=w, **options), x)[0]
    return x, w, options, spec, params


# What each parametrized test launches besides the one-device run: the sharded forward, the fix-up,
# the backward (grad_x from a carry; the carry factor A without grad_x).
LAUNCHES = {"test_speculate_then_fix_up_equals_one_run_bitwise": ("forward", "fixup"),
            "test_backward_is_affine_in_the_carry": ("forward", "backward"),
            "test_every_one_state_model_shards_exactly": ("forward", "fixup", "backward")}


def kernel_variants(item):
    """The host variants of a parametrized case (tests/_prebuild.py): the one-device run's, then
    the sharded kernels' for the same options."""
    launches, p = LAUNCHES.get(item.originalname), item.callspec.params
    if launches is None:
        return None
    if "model" in p:
        model, dtype, full = p["model"], torch.float32, _model_options(p["model"])
    else:
        model, dtype = "lif", p["dtype"]
        _, w, full, _, _ = _setup(p["kind"], dtype, p["v_reset"], T=2, N=1)
        full = dict(full, w=w)
    spec, m = K.NeuronSpec.from_options(model=model, **full), REGISTRY[model]
    options = {k: v for k, v in full.items() if k != "surrogate_function"}
    names = call_variants(model, dtype, options, full.get("surrogate_function"), param_grads=False,
                          grad="backward" in launches)
    names.append(forward_variant(m, dtype, spec.form))
    if "fixup" in launches:
        names.append(fixup_variant(m, dtype, spec.form))
    if "backward" in launches:
        names += [backward_variant(m, dtype, spec.surrogate_id, spec.backward_form, False, shard=shard)
                  for shard in (False, True)]
    return names


def _v0(x, v_reset):
    # the one-device initial state: v_reset (0 for soft reset) in the state dtype
    return torch.full((x.shape[1],), v_reset or 0.0, dtype=ops.state_dtype(x.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("v_reset", RESETS)
def test_speculate_then_fix_up_equals_one_run_bitwise(dtype, kind, v_reset):
    """Split at several points, speculate the second part from bad guesses (including NaN and
    inf, which never match), fix it up from the true state: spikes, v_seq, the checkpoints the
    backward will use and the final state equal the unsplit run bit for bit."""
    x, w, options, spec, params = _setup(kind, dtype, v_reset)
    s_ref, v_ref, vs_ref = lif_multi_step(x, w=w, store_v_seq=True, **options)
    acc = ops.state_dtype(dtype)
    for t0, guess in [(1, 0.0), (17, 0.37), (16, float("nan")), (30, float("inf")), (40, -3.0)]:
        s1, v1, vs1, _ = K.shard_forward(x[:t0].contiguous(), _v0(x, v_reset), spec, params, True, True)
        x2 = x[t0:].contiguous()
        s2, v2, vs2, ck2 = K.shard_forward(x2, torch.full_like(v1, guess), spec, params, True, True)
        L = K.shard_fixup(x2, v1, ck2, s2, vs2, v2, spec, params)
        assert torch.equal(torch.cat([s1, s2]), s_ref), (t0, guess)
        assert torch.equal(torch.cat([vs1, vs2]), vs_ref), (t0, guess)
        assert torch.equal(v2, v_ref), (t0, guess)
        _, _, _, ck_true = K.shard_forward(x2, v1, spec, params, False, True)
        assert torch.equal(ck2, ck_true), (t0, guess)
        assert int(L.min()) >= 0 and int(L.max()) <= x2.shape[0]
        if guess != guess or guess == float("inf"):  # NaN/inf h never equals a finite one
            assert bool((L == x2.shape[0]).all()), (t0, guess)


def test_fix_up_length_is_zero_for_a_right_guess_and_full_for_soft_reset_if():
    x, w, options, spec, params = _setup("lif", torch.float32, 0.0, decay_input=False)
    v1 = K.shard_forward(x[:9].contiguous(), _v0(x, 0.0), spec, params, False, False)[1]
    x2 = x[9:].contiguous()
    s2, v2, _, ck2 = K.shard_forward(x2, v1.clone(), spec, params, False, True)
    assert bool((K.shard_fixup(x2, v1, ck2, s2, None, v2, spec, params) == 0).all())
    # LIF, hard reset: the wrong guess is forgotten (leak and reset) well before the slice ends
    s2, v2, _, ck2 = K.shard_forward(x2, torch.full_like(v1, 0.35), spec, params, False, True)
    L = K.shard_fixup(x2, v1, ck2, s2, None, v2, spec, params)
    assert L.float().mean() < 16 and int(L.max()) < x2.shape[0]
    # IF, soft reset: v_t - v'_t stays v_0 - v'_0 for ever, so no neuron ever matches
    x, w, options, spec, params = _setup("if", torch.float64, None, decay_input=False)
    v1 = K.shard_forward(x[:9].contiguous(), _v0(x, None), spec, params, False, False)[1]
    x2 = x[9:].contiguous()
    s2, v2, _, ck2 = K.shard_forward(x2, torch.full_like(v1, 0.125), spec, params, False, True)
    assert bool((K.shard_fixup(x2, v1, ck2, s2, None, v2, spec, params) == x2.shape[0]).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("v_reset", RESETS)
def test_backward_is_affine_in_the_carry(dtype, kind, v_reset):
    """grad_v_init = A * carry_in + B, and the final pass from the true carry gives the unsplit
    gradient (bitwise when the carry is passed on exactly, as here)."""
    x, w, options, spec, params = _setup(kind, dtype, v_reset, seed=3)
    g = torch.Generator().manual_seed(5)
    grad_spike = torch.randn(x.shape, generator=g).to(dtype)
    x_ref = x.clone().requires_grad_()
    s_ref, _, _ = lif_multi_step(x_ref, w=w, **options)
    (s_ref.float() * grad_spike.float()).sum().backward()
    t0 = 23
    x1, x2 = x[:t0].contiguous(), x[t0:].contiguous()
    _, v1, _, ck1 = K.shard_forward(x1, _v0(x, v_reset), spec, params, False, True)
    _, _, _, ck2 = K.shard_forward(x2, v1, spec, params, False, True)
    gx2, carry, _, _ = K.shard_backward(grad_spike[t0:].contiguous(), None, None, None, x2, ck2, spec,
                                        params, True, False, False)
    gx1, gv0, _, _ = K.shard_backward(grad_spike[:t0].contiguous(), None, None, carry, x1, ck1, spec,
                                      params, True, False, False)
    assert torch.equal(torch.cat([gx1, gx2]), x_ref.grad)
    no_x, b, a, _ = K.shard_backward(grad_spike[:t0].contiguous(), None, None, None, x1, ck1, spec,
                                     params, False, True, False)
    assert no_x is None
    tol = grad_tolerance(torch.float32 if dtype != torch.float64 else dtype)
    torch.testing.assert_close(a * carry + b, gv0, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, gv0.abs().max()))


def test_affine_maps_compose_like_the_sequential_carry():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 7, generator=g, dtype=torch.float64) for _ in range(5)]
    c = torch.zeros(7, dtype=torch.float64)
    for m in reversed(maps):
        c = m[0] * c + m[1]
    total = maps[0]
    for m in maps[1:]:
        total = compose(total, m)
    torch.testing.assert_close(total[1], c)
    left = compose(compose(maps[0], maps[1]), maps[2])
    right = compose(maps[0], compose(maps[1], maps[2]))
    torch.testing.assert_close(left, right)
    assert scan_rounds(2) == [] and scan_rounds(3) == [1] and scan_rounds(4) == [1, 2]
    assert scan_rounds(8) == [1, 2, 4] and scan_rounds(9) == [1, 2, 4]


def test_kernels_are_in_the_nvrtc_list():
    from sj_temporal_fusion import _cuda
    names = _cuda.all_name_expressions()
    for model in REGISTRY.values():
        fixups = [n for n in names if n.startswith(f"neuron_fixup<{model.struct},")]
        forward_forms = {f & ~model.detach_bit for f in model.forms}
        assert set(fixups) >= ({n for n in fixups if ", float," in n} if model.shardable else set())
        assert len([n for n in fixups if ", float," in n]) == (len(forward_forms) if model.shardable else 0)
        shard = [n for n in names if n.startswith(f"neuron_backward<{model.struct},") and n.endswith(", true>")
                 and n.count(",") == 6]
        assert bool(shard) == model.shardable


def _model_options(model):
    """The model's first grid options, its learnable parameters as plain tensors."""
    mc = MODELS[model]
    options = dict(mc.fixed, **{k: v[0] for k, v in mc.grid.items()})
    return dict(options, **{k: v.detach() for k, v in mc.learnable(options).items()})


@pytest.mark.parametrize("model", [name for name, m in REGISTRY.items() if m.shardable])
def test_every_one_state_model_shards_exactly(model):
    """Speculate the second half of a sequence from a wrong state, fix it up from the true one:
    spikes, v and the carry-affine backward equal the one-device run."""
    mc = MODELS[model]
    full = _model_options(model)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 300, generator=g) * mc.x_scale + mc.x_shift
    s_ref, (v_ref,), _ = neuron_multi_step(x, model=model, **full)
    spec = K.NeuronSpec.from_options(model=model, **full)
    params = K.neuron_parameters(dict(full, model=model), x)[0]
    v0 = torch.full((300,), spec.v_reset)
    s1, v1, _, ck1 = K.shard_forward(x[:17].contiguous(), v0, spec, params, False, True)
    x2 = x[17:].contiguous()
    s2, v2, _, ck2 = K.shard_forward(x2, torch.full_like(v1, 0.3), spec, params, False, True)
    K.shard_fixup(x2, v1, ck2, s2, None, v2, spec, params)
    assert torch.equal(torch.cat([s1, s2]), s_ref)
    if mc.exact:
        assert torch.equal(v2, v_ref)
    else:  # EIF on the host: the fix-up's scalar expf and the forward's vectorised (libmvec) expf round differently
        torch.testing.assert_close(v2, v_ref, rtol=1e-5, atol=1e-6)
    grad_spike = torch.randn(x.shape, generator=g)
    x_ref = x.clone().requires_grad_()
    (neuron_multi_step(x_ref, model=model, **full)[0] * grad_spike).sum().backward()
    gx2, carry, _, _ = K.shard_backward(grad_spike[17:].contiguous(), None, None, None, x2, ck2, spec, params,
                                        True, False)
    gx1, gv0, _, _ = K.shard_backward(grad_spike[:17].contiguous(), None, None, carry, x[:17].contiguous(), ck1,
                                      spec, params, True, False)
    torch.testing.assert_close(torch.cat([gx1, gx2]), x_ref.grad, rtol=0 if mc.exact else 1e-5,
                               atol=0 if mc.exact else 1e-6)
    _, b, a, _ = K.shard_backward(grad_spike[:17].contiguous(), None, None, None, x[:17].contiguous(), ck1, spec,
                                  params, False, True)
    torch.testing.assert_close(a * carry + b, gv0, rtol=2e-5, atol=2e-6 * max(1.0, gv0.abs().max()))


def test_the_model_is_named_not_assumed():
    """No model defaults to LIF: options without one are a clear error, not LIF's kernels."""
    with pytest.raises(TypeError, match="model"):
        K.NeuronSpec.from_options(kind="if")
    with pytest.raises(ValueError, match="no 'model'.*node_options"):
        K.neuron_parameters(dict(kind="if"), torch.zeros(2, 3))


def test_a_model_with_two_state_variables_is_refused_by_name():
    with pytest.raises(ValueError, match="'izhikevich'.*IzhikevichNode.*2 state variables"):
        K.NeuronSpec.from_options(model="izhikevich")
