"""BatchNorm folded into the neuron kernel: the kernels' FOLD variants (csrc/temporal.cu's Affine),
``functional.batch_norm_scale_shift`` and ``optimize(net, fold_bn=True)`` (optimize/fold_bn.py).

Tolerances. The kernel: a folded launch equals the unfolded kernel run on x_eff = x * scale +
shift computed by torch (a multiply, then an add, as the kernel rounds it) bit for bit, in every
dtype and in both code shapes. Networks: folded and unfolded differ only by rounding (the
unfolded BatchNorm computes (x - mean) * invstd * weight + bias, the fold x * scale + shift, and
its statistics come from torch.var_mean instead of the BatchNorm kernel); a spike can then differ
only where h lies within rounding of the threshold, which these seeds do not hit: outputs and
losses agree to 1e-12 (fp64) / 1e-5 (fp32) relative, every parameter gradient to 1e-9 of its
largest entry (fp64; the tight check) or to 1e-3 of the network's largest gradient (fp32: there
the convolutions' threaded reductions are not bitwise reproducible, and a spike within rounding
of the threshold may flip between runs, which moves a few gradients by ~1e-4 relative), running
statistics to 1e-12 / 1e-6, num_batches_tracked exactly.
"""
import copy
import io
import pickle

import pytest
import torch
from spikingjelly.activation_based import functional, layer, neuron, surrogate as S
from spikingjelly.activation_based.model import sew_resnet, spiking_resnet

import sj_temporal_fusion
from sj_temporal_fusion import _host, functional as F, ops
from sj_temporal_fusion.optimize import fold_pairs, folded, optimized
from sj_temporal_fusion.reference import neuron_reference

from _prebuild import call_variants

LIF = dict(tau=1.25, decay_input=False, v_threshold=0.3, surrogate_function=S.Sigmoid(alpha=4.))


# ---------------------------------------------------------------- the kernel

def _case(dtype, T=19, shape=(3, 5, 7), seed=0):
    """x (T, B, C, L) around the threshold and a BatchNorm-like affine over C = 5, inner = 7."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, *shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    acc = ops.state_dtype(dtype)
    scale = (torch.rand(shape[1], generator=g, dtype=torch.float64) * 0.6 + 0.2).to(acc)
    shift = (torch.randn(shape[1], generator=g, dtype=torch.float64) * 0.2).to(acc)
    return x, scale, shift, shape[2], shape[1]


def _x_eff(x, scale, shift, inner, channels):
    acc = scale.dtype
    x4 = x.to(acc).reshape(x.shape[0], -1, channels, inner)
    return (x4 * scale.view(-1, 1)).add(shift.view(-1, 1)).reshape(x.shape)  # multiply, then add


def _x_eff_options(model):
    if model == "lif":
        return dict(v_threshold=0.7, kind="plif", w=torch.tensor(-0.4, dtype=torch.float64, requires_grad=True))
    return {}


def kernel_variants(item):
    """The host variants of ``test_folded_kernel_equals_unfolded_on_x_eff`` (tests/_prebuild.py):
    the folded ones in x's dtype, the unfolded ones in the state dtype x_eff is computed in."""
    if item.originalname != "test_folded_kernel_equals_unfolded_on_x_eff":
        return None
    model, dtype, gpu_shape = (item.callspec.params[k] for k in ("model", "dtype", "gpu_shape"))
    options = dict(_x_eff_options(model), store_v_seq=True)
    names = [name for x_dtype, fold in ((dtype, True), (ops.state_dtype(dtype), False))
             for name in call_variants(model, x_dtype, options, S.Sigmoid(alpha=4.), model == "lif", fold_bn=fold)]
    return [(name, gpu_shape, False) for name in names]


@pytest.mark.parametrize("gpu_shape", [False, True], ids=["cpu_shape", "gpu_shape"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("model", ["lif", "izhikevich"])
def test_folded_kernel_equals_unfolded_on_x_eff(model, dtype, gpu_shape):
    # Bit for bit: spikes, final state, v_seq and (backward) dL/dx_eff and the parameter gradient.
    x, scale, shift, inner, channels = _case(dtype)
    x_eff = _x_eff(x, scale, shift, inner, channels)  # in the state dtype: what the kernel reads
    options = _x_eff_options(model)
    g = torch.Generator().manual_seed(5)
    grad_spike = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)  # exact in both runs
    results = []
    with _host.emulate_gpu_shape() if gpu_shape else _nothing():
        for inputs, fold in ((x, (scale, shift, inner, channels)), (x_eff, None)):
            inputs = inputs.detach().requires_grad_()
            spike, state, v_seq = F.neuron_multi_step(inputs, model=model, fold_bn=fold, store_v_seq=True,
                                                      surrogate_function=S.Sigmoid(alpha=4.), **options)
            (spike * grad_spike.to(spike.dtype)).sum().backward()
            grads = [inputs.grad] + ([options["w"].grad.clone()] if model == "lif" else [])
            if model == "lif":
                options["w"].grad = None
            results.append((spike.float(), [s.clone() for s in state], v_seq.to(state[0].dtype), grads))
    (s1, z1, v1, g1), (s2, z2, v2, g2) = results
    assert torch.equal(s1, s2)
    assert all(torch.equal(a, b) for a, b in zip(z1, z2))
    assert torch.equal(v1, v2.to(dtype).to(v1.dtype))  # v_seq is stored in x's dtype
    # dL/dx: the unfolded gradient w.r.t. x_eff, times scale (the folded op's autograd).
    want = (_x_eff(g2[0].to(scale.dtype), scale, torch.zeros_like(shift), inner, channels)).to(dtype)
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(g1[0], want)
    else:  # dL/dx_eff is rounded to x's dtype before the multiply: one rounding apart
        torch.testing.assert_close(g1[0].float(), want.float(), rtol=torch.finfo(dtype).eps * 2, atol=1e-6)
    for a, b in zip(g1[1:], g2[1:]):
        torch.testing.assert_close(a, b, rtol=1e-6 if dtype != torch.float64 else 1e-13, atol=0)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_folded_kernel_matches_the_reference():
    # fp64 against the pure-PyTorch oracle on x * scale + shift.
    x, scale, shift, inner, channels = _case(torch.float64, seed=3)
    spike, (v,), _ = F.neuron_multi_step(x, fold_bn=(scale, shift, inner, channels), kind="lif", tau=1.8,
                                         v_threshold=0.6)
    ref_spike, (ref_v,), _ = neuron_reference(_x_eff(x, scale, shift, inner, channels), kind="lif", tau=1.8,
                                              v_threshold=0.6)
    assert torch.equal(spike, ref_spike)
    torch.testing.assert_close(v, ref_v, rtol=1e-13, atol=1e-13)


def test_gradcheck_folded_op_fp64():
    # x, scale and shift through ops.neuron_forward's autograd; detach_reset makes the final state
    # and v_seq differentiable away from the threshold (T = 19 crosses a checkpoint).
    x, scale, shift, inner, channels = _case(torch.float64, T=19, shape=(2, 3, 2), seed=4)
    x, scale, shift = (t.detach().requires_grad_() for t in (x, scale, shift))

    def run(x, scale, shift):
        _, (v,), v_seq = F.neuron_multi_step(x, fold_bn=(scale, shift, inner, channels), kind="lif", tau=1.8,
                                             v_threshold=0.6, detach_reset=True, store_v_seq=True)
        return v, v_seq
    assert torch.autograd.gradcheck(run, (x, scale, shift), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_batch_norm_scale_shift_fp64():
    # Through the batch statistics to x, and to weight and bias.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_()
    fn = lambda x, w, b: F.batch_norm_scale_shift(x, 2, None, None, w, b, True, 0.1, 1e-5)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_fold_arguments_are_checked():
    x, scale, shift, inner, channels = _case(torch.float32)
    with pytest.raises(ValueError, match="batch_norm_scale_shift"):
        F.neuron_multi_step(x, fold_bn=(scale, shift, inner, channels + 1))
    with pytest.raises(ValueError, match="batch_norm_scale_shift"):
        F.neuron_multi_step(x, fold_bn=(scale.double(), shift, inner, channels))


def test_opcheck_folded_ops():
    x, scale, shift, inner, channels = _case(torch.float32, T=5)
    from sj_temporal_fusion.neurons import REGISTRY
    m = REGISTRY["lif"]
    o = dict(m.defaults)
    params, _ = F.parameter_tensor(m.param_values(o), torch.float32, torch.device("cpu"))
    v0 = torch.zeros(x.shape[1:])
    args = (x.requires_grad_(), v0, torch.empty(0), params, "lif", m.forward_form(o), m.form(o), 0, 4.0, 0.0, 0,
            True, True, scale.requires_grad_(), shift.requires_grad_(), inner, channels)
    torch.library.opcheck(ops.neuron_forward, args)


# ---------------------------------------------------------------- the switch, on networks

def _resnet(module, dtype):
    torch.manual_seed(0)
    make = module.spiking_resnet18 if module is spiking_resnet else sew_resnet.sew_resnet18
    kw = dict(cnf="ADD") if module is sew_resnet else {}
    net = make(spiking_neuron=neuron.LIFNode, num_classes=10, **kw, **LIF).to(dtype)
    functional.set_step_mode(net, "m")
    functional.set_backend(net, "temporal_fusion")
    return net


def _vgg(dtype):
    """Both VGG spellings: multi-step layer.BatchNorm2d after a conv in a Sequential, and
    SeqToANNContainer(conv, BatchNorm2d) followed by the neuron; a PLIF neuron in the second, a
    BatchNorm with momentum=None (cumulative average) and one with affine=False."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        layer.Conv2d(3, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.LIFNode(**LIF),
        layer.SeqToANNContainer(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8, momentum=None)),
        neuron.ParametricLIFNode(v_threshold=0.3, surrogate_function=S.Sigmoid(alpha=4.)),
        layer.MaxPool2d(2), layer.Flatten(start_dim=1),
        layer.SeqToANNContainer(torch.nn.Linear(8 * 8 * 8, 16), torch.nn.BatchNorm1d(16, affine=False)),
        neuron.LIFNode(**LIF), layer.Linear(16, 10)).to(dtype)
    functional.set_step_mode(net, "m")
    functional.set_backend(net, "temporal_fusion")
    return net


ZOO = {"spiking_resnet18": lambda d: _resnet(spiking_resnet, d), "sew_resnet18": lambda d: _resnet(sew_resnet, d),
       "vgg": _vgg}
FOLDED_PAIRS = {"spiking_resnet18": 9, "sew_resnet18": 17, "vgg": 3}
# stats: relative to the largest running statistic, which may be a mean far smaller than the
# values it averages (fp32: 1.1e-6 seen in one thread, where the reduction order differs).
TOL = {torch.float64: dict(out=1e-12, grad=1e-9, floor=1e-2, stats=1e-12),
       torch.float32: dict(out=1e-5, grad=1e-3, floor=1.0, stats=1e-5)}


def _run(net, x, label, train, reset_net=functional.reset_net, time_first=True):
    """(output, loss, gradients, state dict) of one step; ``time_first``: the output is [T, B, classes]
    (averaged over time for the loss), else already [B, classes]."""
    reset_net(net)
    net.zero_grad(set_to_none=True)
    net.train(train)
    with torch.set_grad_enabled(train):
        out = net(x)
        loss = torch.nn.functional.cross_entropy(out.mean(0) if time_first else out, label)
    if train:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out.detach(), loss.detach(), grads, {k: v.clone() for k, v in net.state_dict().items()}


def _close(a, b, rel, floor=1e-30):
    scale = max(a.abs().max().item(), b.abs().max().item(), floor)
    return (a - b).abs().max().item() <= rel * scale


def _grads_differ(grads_a, grads_b, rel, floor=1e-2):
    """Names of the gradients that differ beyond ``rel`` of their largest entry, or of ``floor``
    times the network's largest where that is more (a convolution's bias before a BatchNorm is
    zero but for rounding: the BatchNorm removes the mean)."""
    largest = max([g.abs().max().item() for g in grads_a.values()], default=0.0)
    return [k for k in grads_a if not _close(grads_a[k], grads_b[k], rel, floor * largest)]


def _assert_runs_agree(a, b, tol, train, step=None):
    """Two runs' (output, loss, gradients, state) agree within ``tol``; gradients only when training."""
    (out_a, loss_a, grads_a, state_a), (out_b, loss_b, grads_b, state_b) = a, b
    assert _close(out_a, out_b, tol["out"]) and _close(loss_a, loss_b, tol["out"]), step
    assert grads_a.keys() == grads_b.keys() and bool(grads_a) == train
    bad = _grads_differ(grads_a, grads_b, tol["grad"], tol["floor"])
    assert not bad, f"gradients differ beyond {tol['grad']}: {bad}"
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(state_a[k], state_b[k]), k
        else:
            assert _close(state_a[k], state_b[k], tol["stats"]), k


def _fold_launches(expressions) -> tuple[int, int]:
    """(FOLD forwards, FOLD backwards) among the launched variants."""
    return tuple(sum(e.startswith(kernel) and e.endswith(", true>") for e in expressions)
                 for kernel in ("neuron_forward", "neuron_backward"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(ZOO))
def test_folded_network_equals_unfolded(name, dtype):
    plain = ZOO[name](dtype)
    fold = sj_temporal_fusion.optimize(copy.deepcopy(plain), spike_bits=False, fold_bn=True)
    assert len(folded(fold)) == FOLDED_PAIRS[name]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 2, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype)
    label = torch.tensor([3, 7])
    tol = TOL[dtype]
    expressions = []
    original = _host.launch

    def spy(expression, *args, **kwargs):
        expressions.append(expression)
        return original(expression, *args, **kwargs)
    # Two training calls (running statistics move, num_batches_tracked counts), then eval twice.
    for train in (True, True, False, False):
        a = _run(plain, x, label, train)
        _host.launch = spy
        try:
            b = _run(fold, x, label, train)
        finally:
            _host.launch = original
        _assert_runs_agree(a, b, tol, train)
    # The fast path ran: every folded pair launched a FOLD forward (and backward when training).
    assert _fold_launches(expressions) == (4 * FOLDED_PAIRS[name], 2 * FOLDED_PAIRS[name])


def test_unfoldable_patterns_are_left_alone():
    net = _resnet(spiking_resnet, torch.float32)
    names = {n for pair in folded(sj_temporal_fusion.optimize(net, spike_bits=False, fold_bn=True)) for n in pair}
    assert "layer1.0.bn1" in names and "layer1.0.sn1" in names
    # bn2 goes to the residual add before sn2; the downsample's BatchNorm to the add.
    assert not {n for n in names if n.endswith("bn2") or "downsample" in n}
    # Something between the BatchNorm and the neuron, a BatchNorm used twice, a BatchNorm subclass.

    class MyBN(torch.nn.BatchNorm2d):
        pass
    shared = torch.nn.BatchNorm2d(4)
    odd = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Identity(),
                            neuron.LIFNode(**LIF, step_mode="s")),
        torch.nn.Sequential(shared, neuron.LIFNode(**LIF, step_mode="s"), shared, neuron.LIFNode(**LIF, step_mode="s")),
        torch.nn.Sequential(MyBN(4), neuron.LIFNode(**LIF, step_mode="s")))
    assert fold_pairs(odd) == []
    with pytest.warns(UserWarning, match="nothing folded"):
        sj_temporal_fusion.optimize(odd, spike_bits=False, fold_bn=True)
    assert optimized(odd) == {"spike_bits": False, "fold_bn": False}


def test_single_step_mode_and_torch_backend_fallback():
    # A folded pair in step mode 's' (T = 1 per call) equals the unfolded one; a pair whose neuron
    # runs another backend runs both modules unchanged.
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                neuron.LIFNode(**LIF, step_mode="s", backend="temporal_fusion")).double()
    fold = sj_temporal_fusion.optimize(copy.deepcopy(plain), spike_bits=False, fold_bn=True)
    x = torch.rand(2, 3, 9, 9, dtype=torch.float64)
    for _ in range(2):  # two steps: the state carries over
        torch.testing.assert_close(fold(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(fold[1].running_var, plain[1].running_var, rtol=1e-12, atol=0)
    functional.set_backend(plain, "torch")
    functional.set_backend(fold, "torch")
    fold.load_state_dict(plain.state_dict())
    functional.reset_net(plain)
    functional.reset_net(fold)
    assert torch.equal(fold(x), plain(x))
    assert torch.equal(fold[1].running_mean, plain[1].running_mean)


def test_state_dict_round_trip_copy_pickle_and_undo():
    plain = _vgg(torch.float64)
    fold = sj_temporal_fusion.optimize(copy.deepcopy(plain), spike_bits=True, fold_bn=True)
    assert optimized(fold) == {"spike_bits": True, "fold_bn": True}
    assert list(fold.state_dict()) == list(plain.state_dict())
    x, label = torch.rand(2, 2, 3, 16, 16, dtype=torch.float64), torch.tensor([1, 2])
    _run(fold, x, label, True)  # the running statistics move
    buffer = io.BytesIO()
    torch.save(fold.state_dict(), buffer)
    buffer.seek(0)
    plain.load_state_dict(torch.load(buffer))  # a folded network's checkpoint loads in a plain one
    fold.load_state_dict(plain.state_dict())   # and back
    want = _run(plain, x, label, True)
    functional.reset_net(fold)  # SpikingJelly's stored states are not graph leaves: no deepcopy before
    for clone in (copy.deepcopy(fold), pickle.loads(pickle.dumps(fold)), fold):
        assert len(folded(clone)) == 3
        got = _run(clone, x, label, True)
        assert _close(got[1], want[1], 1e-12)
        assert got[2].keys() == want[2].keys() and not _grads_differ(want[2], got[2], 1e-9)
    sj_temporal_fusion.optimize(fold, spike_bits=False, fold_bn=False)
    assert optimized(fold) == {"spike_bits": False, "fold_bn": False}
    assert not any("forward" in m.__dict__ for m in fold.modules())
    fold.load_state_dict(plain.state_dict())
    functional.reset_net(plain)
    functional.reset_net(fold)
    plain.eval()
    fold.eval()
    assert torch.equal(fold(x), plain(x))


# ---------------------------------------------------------------- clock_driven, pairs named

def _spikformer(dtype):
    """tests/_sj_nets.py's Spikformer on the temporal_fusion backend: its BatchNorms run in forward
    code (Spikformer's BatchNorm1d between two transposes), so the pairs are named."""
    from _sj_nets import Spikformer
    torch.manual_seed(0)
    net = Spikformer("temporal_fusion").to(dtype)
    return net


def _cd_run(net, x, label, train):
    """One step of a clock_driven network (its reset_net; the Spikformer averages over time itself)."""
    from spikingjelly.clock_driven import functional as cd_functional
    return _run(net, x, label, train, reset_net=cd_functional.reset_net, time_first=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_spikformer_with_named_pairs_equals_unfolded(dtype):
    from _sj_nets import batches
    from sj_temporal_fusion.bench import spikformer
    plain = _spikformer(dtype)
    assert fold_pairs(plain) == []  # nothing to find: the BatchNorms are called in forward code
    fold = copy.deepcopy(plain)
    pairs = spikformer.fold_pairs(fold)
    assert len(pairs) == 9  # 2 patch stages + rpe, q k v proj, fc1 fc2; the attention LIF has no BatchNorm
    sj_temporal_fusion.optimize(fold, spike_bits=False, fold_bn=pairs)
    assert sorted(n for n, _ in folded(fold)) == sorted(n for n, m in fold.named_modules()
                                                         if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    tol = TOL[dtype]
    expressions, original = [], _host.launch

    def spy(expression, *args, **kwargs):
        expressions.append(expression)
        return original(expression, *args, **kwargs)
    # Consecutive batches of different sizes in training (running statistics move), then eval;
    # the last eval runs a pickled copy, whose named pairs must survive.
    data = batches(count=3) + batches(count=2, seed=2)
    for step, ((x, label), train) in enumerate(zip(data, (True, True, True, False, False))):
        x = x.to(dtype)
        a = _cd_run(plain, x, label, train)
        net = pickle.loads(pickle.dumps(fold)) if step == 4 else fold
        _host.launch = spy
        try:
            b = _cd_run(net, x, label, train)
        finally:
            _host.launch = original
        _assert_runs_agree(a, b, tol, train, step)
    assert _fold_launches(expressions) == (5 * len(pairs), 3 * len(pairs))


def test_named_pairs_are_checked():
    from spikingjelly.clock_driven import neuron as cd_neuron
    net = _spikformer(torch.float32)
    attn = net.blocks[0].attn

    class MyBN(torch.nn.BatchNorm1d):
        pass

    class OwnCharge(cd_neuron.MultiStepLIFNode):
        def neuronal_charge(self, x):
            self.v = self.v + x

    stranger = torch.nn.BatchNorm1d(16)
    net.extra_bn, net.own = MyBN(16), OwnCharge()
    net.twice = torch.nn.Sequential(attn.q_bn)  # q_bn now occurs twice in net
    cases = [((attn.q_lif, attn.q_bn), "first module must be a BatchNorm"),
             ((net.extra_bn, attn.q_lif), "exact"),
             ((attn.k_bn, attn.k_linear), "second module must be a neuron"),
             ((attn.k_bn, net.own), "own dynamics"),
             ((stranger, attn.k_lif), "not a module of net"),
             ((attn.q_bn, attn.q_lif), "more than once")]
    for pair, message in cases:
        with pytest.raises(ValueError, match=message):
            sj_temporal_fusion.optimize(net, spike_bits=False, fold_bn=[pair])
    with pytest.raises(ValueError, match="earlier pair"):
        sj_temporal_fusion.optimize(net, spike_bits=False, fold_bn=[(attn.k_bn, attn.k_lif), (attn.v_bn, attn.k_lif)])
    with pytest.raises(ValueError, match="list of"):
        sj_temporal_fusion.optimize(net, spike_bits=False, fold_bn=attn.k_bn)
    assert optimized(net) == {"spike_bits": False, "fold_bn": False}  # a refused call changes nothing


def test_named_pair_whose_neuron_gets_another_tensor_raises():
    # The caller's assertion is wrong here: k_lif receives k's BatchNorm output, not q's. The
    # neuron sees memory other than its BatchNorm's input and refuses instead of folding.
    from spikingjelly.clock_driven import functional as cd_functional
    net = _spikformer(torch.float32)
    attn = net.blocks[0].attn
    sj_temporal_fusion.optimize(net, spike_bits=False, fold_bn=[(attn.q_bn, attn.k_lif)])
    with pytest.raises(RuntimeError, match="did not receive its folded BatchNorm's output unchanged.*leave this pair"):
        net(torch.rand(2, 2, 3, 16, 16))
    # An in-place write between the two: same memory, newer version.
    bn, node = torch.nn.BatchNorm1d(4), _cd_lif()
    seq = torch.nn.Sequential(_Transposed(bn, in_place=True), node)
    sj_temporal_fusion.optimize(seq, spike_bits=False, fold_bn=[(bn, node)])
    cd_functional.reset_net(seq)
    with pytest.raises(RuntimeError, match="unchanged"):
        seq(torch.rand(3, 2, 5, 4))


def _cd_lif():
    from spikingjelly.clock_driven import neuron as cd_neuron
    return cd_neuron.MultiStepLIFNode(tau=2.0, detach_reset=True, backend="temporal_fusion")


class _Transposed(torch.nn.Module):
    """(T, B, N, D) -> BatchNorm1d over D on the (T * B, D, N) transpose -> (T, B, N, D)."""

    def __init__(self, bn, in_place=False):
        super().__init__()
        self.bn, self.in_place = bn, in_place

    def forward(self, x):
        t, b, n, d = x.shape
        y = self.bn(x.flatten(0, 1).transpose(-1, -2)).transpose(-1, -2)
        if self.in_place:
            y.mul_(1.0)
        return y.reshape(t, b, n, d)


def test_transposed_batch_norm_reads_channels_from_strides():
    # The layout alone (no Linear): the folded neuron equals BatchNorm1d-then-neuron in fp64, and
    # a channel-dependent affine shows that channels are D, not N (N != D).
    from spikingjelly.clock_driven import functional as cd_functional
    torch.manual_seed(3)
    bn = torch.nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, 5))
        bn.bias.copy_(torch.linspace(-0.5, 0.5, 5))
    plain = torch.nn.Sequential(_Transposed(bn), _cd_lif()).double()
    fold = copy.deepcopy(plain)
    sj_temporal_fusion.optimize(fold, spike_bits=False, fold_bn=[(fold[0].bn, fold[1])])
    x = (torch.rand(4, 3, 7, 5, dtype=torch.float64) * 2).requires_grad_()
    outs = []
    for net in (plain, fold):
        cd_functional.reset_net(net)
        xi = x.detach().clone().requires_grad_()
        v = net[1]
        spikes = net(xi)
        (spikes.sum() + v.v_seq.sum()).backward()
        outs.append((spikes, v.v_seq.detach(), xi.grad, net[0].bn.weight.grad, net[0].bn.running_var.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_clock_driven_seq_to_ann_container_pair_is_found():
    from spikingjelly.clock_driven import functional as cd_functional, layer as cd_layer
    torch.manual_seed(0)
    plain = torch.nn.Sequential(cd_layer.SeqToANNContainer(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)),
                                _cd_lif()).double()
    fold = sj_temporal_fusion.optimize(copy.deepcopy(plain), spike_bits=False, fold_bn=True)
    assert folded(fold) == [("0.1", "1")]
    x = torch.rand(3, 2, 3, 8, 8, dtype=torch.float64)
    for net in (plain, fold):
        cd_functional.reset_net(net)
    torch.testing.assert_close(fold(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(fold[1].v_seq, plain[1].v_seq, rtol=1e-12, atol=1e-12)
