"""Whole networks in the shape of the codebases that run SpikingJelly's cupy backend today
(tests/_sj_nets.py), switched with ``sj_temporal_fusion.set_backend`` and run against the same
network on the 'torch' backend: consecutive batches with reset_net between, fp32 (forward bit for
bit, gradients to rounding), fp16 autocast with GradScaler and bf16 autocast training steps, and
DistributedDataParallel over 2 gloo ranks against one process on the global batch."""
import copy

import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional as ab_functional
from spikingjelly.clock_driven import functional as cd_functional

import sj_temporal_fusion
from sj_temporal_fusion import ops

from _group import results_ok, run_group
from _sj_nets import NETS, B, build, batches, neurons


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts fused forward launches: proves the nodes ran our kernels, not a silent fallback."""
    calls = []
    original = ops.neuron_forward

    def counting(*args, **kwargs):
        calls.append(args[4])  # the model's name
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "neuron_forward", counting)
    return calls


def reset_net(name, net):
    (ab_functional if name == "activation_based_subclass" else cd_functional).reset_net(net)


def switched(net):
    ours = copy.deepcopy(net)
    result = sj_temporal_fusion.set_backend(ours, "temporal_fusion")
    assert not result.not_switched, result.not_switched
    assert len(result.switched) == len(neurons(ours)) > 0
    return ours


def assert_grads_close(net_ref, net, rtol, atol_of_max, context=""):
    """Gradients to rounding: each within rtol, or atol_of_max of the largest gradient entry of the
    network (a rounding difference in one neuron's backward spreads into every earlier layer)."""
    scale = max(p.grad.abs().max().item() for p in net_ref.parameters() if p.grad is not None)
    for (name, p), q in zip(net_ref.named_parameters(), net.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol_of_max * scale,
                                       msg=lambda m: f"{context}{name}: {m}")
    return scale


def _step(net, x, y):
    net.zero_grad(set_to_none=True)
    out = net(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    state = [(getattr(n, "v_seq", None), n.v) for n in neurons(net)]
    return out, loss, state


@pytest.mark.parametrize("name", list(NETS))
def test_matches_torch_backend_over_consecutive_batches(name, kernel_calls):
    net_torch = build(name).train()
    net_ours = switched(net_torch)
    for i, (x, y) in enumerate(batches()):
        kernel_calls.clear()
        out_t, loss_t, state_t = _step(net_torch, x, y)
        assert not kernel_calls
        out_o, loss_o, state_o = _step(net_ours, x, y)
        assert len(kernel_calls) == len(neurons(net_ours))
        assert torch.equal(out_o, out_t) and torch.equal(loss_o, loss_t), f"batch {i}"  # fp32: bit for bit
        for k, ((v_seq_t, v_t), (v_seq_o, v_o)) in enumerate(zip(state_t, state_o)):
            assert (v_seq_t is None) == (v_seq_o is None)
            if v_seq_t is not None:
                assert torch.equal(v_seq_o, v_seq_t), f"batch {i}, node {k}: v_seq"
                assert torch.equal(v_o, v_seq_o[-1]), f"batch {i}, node {k}: v is v_seq's last step"
            assert torch.equal(v_o, v_t), f"batch {i}, node {k}: v"
        assert_grads_close(net_torch, net_ours, rtol=1e-4, atol_of_max=1e-5, context=f"batch {i}: ")
        for bn_t, bn_o in zip(net_torch.modules(), net_ours.modules()):
            if isinstance(bn_t, torch.nn.modules.batchnorm._BatchNorm):
                assert torch.equal(bn_o.running_mean, bn_t.running_mean)
        reset_net(name, net_torch)
        reset_net(name, net_ours)
        assert all(n.v == n._memories_rv["v"] for n in neurons(net_ours))


def _neurons_in_fp32(net):
    """The torch backend with each neuron computing in fp32 on its (fp16/bf16) input and handing
    back spikes in the input dtype: what our kernels compute (fp32 state, output rounded once)."""
    def before(node, args):
        node._input_dtype = args[0].dtype
        return (args[0].float(),)

    def after(node, args, out):
        return out.to(node._input_dtype)

    for node in neurons(net):
        node.register_forward_pre_hook(before)
        node.register_forward_hook(after)
    return net


# A rounding difference of one fp16/bf16 ulp in a neuron's grad_x (our fp32 backward and the
# reference's fp32 autograd sum in different orders before the one rounding) reaches every
# earlier layer: gradients agree to a few ulp of the dtype, relative to the network's largest.
AMP = {torch.float16: dict(rtol=4 * 2 ** -10, atol_of_max=4 * 2 ** -10),
       torch.bfloat16: dict(rtol=4 * 2 ** -7, atol_of_max=4 * 2 ** -7)}


@pytest.mark.parametrize("name, dtype", [("spikformer", torch.float16), ("spike_driven_plif", torch.float16),
                                         ("spikformer", torch.bfloat16), ("sew_if_add", torch.bfloat16)])
def test_autocast_training_steps(name, dtype, kernel_calls):
    """Training steps under CPU autocast (fp16 with a GradScaler, bf16 without), consecutive batches
    with reset_net between. Each step starts from equal weights (ours copied into the reference
    after the optimizer step, which itself is compared first)."""
    reference = _neurons_in_fp32(build(name).train())
    ours = switched(build(name).train())
    opts = [torch.optim.SGD(net.parameters(), lr=0.1) for net in (reference, ours)]
    scalers = [torch.amp.GradScaler("cpu", enabled=dtype == torch.float16) for _ in range(2)]
    for i, (x, y) in enumerate(batches()):
        results = []
        kernel_calls.clear()
        for net, opt, scaler in zip((reference, ours), opts, scalers):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype):
                out = net(x)
                loss = F.cross_entropy(out, y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            state = [(n.v_seq, n.v) for n in neurons(net)]
            results.append((out, loss, state))
        assert len(kernel_calls) == len(neurons(ours))
        (out_r, loss_r, state_r), (out_o, loss_o, state_o) = results
        assert out_o.dtype == dtype and torch.equal(out_o, out_r) and torch.equal(loss_o, loss_r), f"batch {i}"
        for (v_seq_r, v_r), (v_seq_o, v_o) in zip(state_r, state_o):
            assert v_seq_o.dtype == dtype and v_o.dtype == torch.float32
            assert torch.equal(v_seq_o, v_seq_r.to(v_seq_o.dtype)) and torch.equal(v_o, v_r)
        scale = assert_grads_close(reference, ours, **AMP[dtype], context=f"{dtype} batch {i}: ")
        for opt, scaler in zip(opts, scalers):
            scaler.step(opt)
            scaler.update()
        assert scalers[1].get_scale() == scalers[0].get_scale()  # no inf/nan step skipped on one side only
        for p, q in zip(reference.parameters(), ours.parameters()):  # SGD, lr 0.1: 0.1 x the gradients' bound
            torch.testing.assert_close(q, p, rtol=0, atol=0.1 * 2 * AMP[dtype]["atol_of_max"] * scale)
        reference.load_state_dict(ours.state_dict())
        for net in (reference, ours):
            cd_functional.reset_net(net)


def _eval_batch_norm(net):
    # Batch statistics would differ between one rank's half batch and the global batch (SyncBatchNorm
    # needs a GPU): the BatchNorms run on their running statistics, the rest trains.
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return net


def _ddp_rank(rank, k, name):
    import sj_temporal_fusion as stf
    from torch.nn.parallel import DistributedDataParallel
    from _sj_nets import batches as make_batches, build as make_net
    net = make_net(name).train()
    stf.set_backend(net, "temporal_fusion")
    ddp = DistributedDataParallel(_eval_batch_norm(net))
    per_rank = []
    for x, y in make_batches(2, sizes=(2 * B,)):
        lo, hi = rank * x.shape[1] // k, (rank + 1) * x.shape[1] // k
        ddp.zero_grad(set_to_none=True)
        out = ddp(x[:, lo:hi])
        F.cross_entropy(out, y[lo:hi]).backward()
        per_rank.append((out.detach().numpy().copy(),
                         {n: p.grad.numpy().copy() for n, p in net.named_parameters()}))
        cd_functional.reset_net(net)
    return per_rank


@pytest.mark.slow  # process groups
@pytest.mark.parametrize("name", ["spikformer", "spike_driven_plif"])
def test_distributed_data_parallel_equals_one_process(name, tmp_path):
    k = 2
    ranks = results_ok(run_group(k, _ddp_rank, name, tmp_path=tmp_path))
    net = _eval_batch_norm(switched(build(name).train()))
    for step, (x, y) in enumerate(batches(2, sizes=(2 * B,))):
        net.zero_grad(set_to_none=True)
        out = net(x)
        F.cross_entropy(out, y).backward()
        cd_functional.reset_net(net)
        for rank in range(k):
            rank_out, rank_grads = ranks[rank][step]
            lo, hi = rank * x.shape[1] // k, (rank + 1) * x.shape[1] // k
            torch.testing.assert_close(torch.from_numpy(rank_out), out[lo:hi].detach(), rtol=1e-5, atol=1e-6)
            scale = max(p.grad.abs().max().item() for p in net.parameters())
            for n, p in net.named_parameters():
                # DDP averages the two half-batch means: the global mean, summed in another order
                torch.testing.assert_close(torch.from_numpy(rank_grads[n]), p.grad, rtol=1e-4, atol=1e-5 * scale,
                                           msg=lambda m: f"rank {rank} step {step} {n}: {m}")
