"""The time-sharding tests' shared rank code (tests/test_distributed.py runs it over gloo,
tests/test_distributed_transport.py over the CuPy NCCL transport under NCCL's rules): the parity
grid and its worker, which checks each rank's slice against the one-device run, the worker that
records the host variants the grid launches, and the mismatched-slice scenarios."""
from __future__ import annotations

import copy
import itertools

import torch

from _grid import DTYPES, RESETS, SHARD_KINDS, grad_tolerance, shard_group_options
from _group import progress


def parity_cases(k):
    """Every kind x reset x dtype, each at three lengths not divisible by k (one with slices
    longer than a 16-step checkpoint chunk). The options that pick a kernel variant vary from one
    kind x reset x dtype to the next (``shard_group_options``) and are shared by its three
    lengths, so the lengths reuse one set of variants (their compile, not the sharding, was most
    of this test's time); the loss and the shape vary from case to case."""
    cases, i = [], 0
    for kind, v_reset, dtype in itertools.product(SHARD_KINDS, RESETS, DTYPES):
        options = shard_group_options(kind, v_reset, dtype)
        for T in (k + 1, 37, 71):
            cases.append(dict(kind=kind, v_reset=v_reset, dtype=dtype, T=T, seed=i, **options,
                              loss_on_v=i % 2 == 1, shape=(3, 37) if i % 4 else (111,)))
            i += 1
    return cases


def make_node(case):
    from spikingjelly.activation_based import neuron
    common = dict(v_threshold=0.4, v_reset=case["v_reset"], detach_reset=case["detach_reset"],
                  surrogate_function=case["surrogate"], step_mode="m", backend="temporal_fusion",
                  store_v_seq=True)
    if case["kind"] == "if":
        return neuron.IFNode(**common)
    if case["kind"] == "lif":
        return neuron.LIFNode(tau=1.7, decay_input=case["decay_input"], **common)
    return neuron.ParametricLIFNode(init_tau=1.6, decay_input=case["decay_input"], **common)


def parity_worker(rank, k, cases):
    import torch.distributed as dist
    import sj_temporal_fusion  # noqa: F401  (registers the backend)
    from sj_temporal_fusion.distributed import TimeShardedNode, time_slice
    problems, fixups = [], []
    for case in cases:
        progress()
        name = f"{case['kind']}-{case['v_reset']}-{str(case['dtype'])[6:]}-T{case['T']}-#{case['seed']}"
        g = torch.Generator().manual_seed(case["seed"])
        T, dtype = case["T"], case["dtype"]
        x_full = (torch.randn((T,) + case["shape"], generator=g) * 0.6 + 0.25).to(dtype)
        g_spike = torch.randn(x_full.shape, generator=g)
        # Quarters: where the reference adds the two gradients of one v in bf16, the sum is exact.
        g_vseq = torch.randint(-8, 9, x_full.shape, generator=g) / 4
        g_v = torch.randint(-8, 9, (k,) + case["shape"], generator=g) / 4
        x_next = (torch.randn((T,) + case["shape"], generator=g) * 0.6 + 0.25).to(dtype)
        slices = [time_slice(T, r, k) for r in range(k)]
        mine = slices[rank]

        ref = make_node(case)
        sharded_inner = copy.deepcopy(ref)
        sharded_inner.store_v_seq = case["store_v_seq"]
        x_ref = x_full.clone().requires_grad_()
        s_ref = ref(x_ref)
        v_seq_ref = ref.v_seq
        loss = (s_ref.float() * g_spike).sum()
        if case["store_v_seq"]:
            loss = loss + (v_seq_ref.float() * g_vseq).sum()
        if case["loss_on_v"]:
            loss = loss + sum((v_seq_ref[s.stop - 1].float() * g_v[r]).sum() for r, s in enumerate(slices))
        loss.backward()

        node = TimeShardedNode(sharded_inner, T=T, name=f"parity {name}", timeout=60)
        x_loc = x_full[mine].clone().requires_grad_()
        s_loc = node(x_loc)
        loss = (s_loc.float() * g_spike[mine]).sum()
        if case["store_v_seq"]:
            loss = loss + (node.v_seq.float() * g_vseq[mine]).sum()
        if case["loss_on_v"]:
            loss = loss + (node.v.float() * g_v[rank]).sum()
        loss.backward()

        def check(ok, what):
            if not ok:
                problems.append(f"{name}: {what}")

        check(torch.equal(s_loc, s_ref[mine].detach()), "spikes differ")
        # the state is kept in the state dtype; v_seq is it rounded to x's dtype
        check(torch.equal(node.v.to(dtype), v_seq_ref[mine.stop - 1].detach()), "final v of the slice differs")
        if case["store_v_seq"]:
            check(torch.equal(node.v_seq, v_seq_ref[mine].detach()), "v_seq differs")
        tol = grad_tolerance(dtype)
        scale = max(1.0, x_ref.grad.abs().max().item())
        if not torch.allclose(x_loc.grad.double(), x_ref.grad[mine].double(), rtol=tol["rtol"],
                              atol=tol["atol"] * scale):
            err = (x_loc.grad.double() - x_ref.grad[mine].double()).abs().max().item()
            problems.append(f"{name}: grad_x differs by {err:.3g} (scale {scale:.3g})")
        if case["kind"] == "plif":
            w_grad = sharded_inner.w.grad.detach().clone()
            dist.all_reduce(w_grad)
            # w is fp32 whatever x's dtype: its gradient is summed over T steps, in two parts here
            wtol = grad_tolerance(ref.w.dtype)
            if not torch.allclose(w_grad.double(), ref.w.grad.double(), rtol=wtol["rtol"] * 10,
                                  atol=wtol["atol"] * max(1.0, ref.w.grad.abs().item())):
                problems.append(f"{name}: summed w.grad {w_grad.item()} != {ref.w.grad.item()}")
        stats = node.fixup_stats()
        if stats is not None:
            fixups.append((case["kind"], case["v_reset"], str(dtype), stats["max"], stats["unmatched"]))
        # A second call without reset continues in time: rank 0 starts from the last rank's state.
        with torch.no_grad():
            s2_ref = ref(x_next)
            s2 = node(x_next[mine])
        check(torch.equal(s2, s2_ref[mine]), "second call (state continued) spikes differ")
        check(torch.equal(node.v.to(dtype), ref.v_seq[mine.stop - 1]), "second call final v differs")
    return problems, fixups


def assert_ranks_match(results: dict, k: int) -> None:
    """No rank of a ``parity_worker`` group (``results``: rank -> its return) found a mismatch."""
    problems = [p for r in sorted(results) for p in results[r][0]]
    assert not problems, f"{len(problems)} mismatches on {k} ranks:\n" + "\n".join(problems[:40])


def planning_worker(rank, k, cases):
    """The host variants ``parity_worker`` launches on this rank, recorded, not compiled or run
    (the launches' tensors are zeroed instead)."""
    from experiments.gpu_validation.record import recording
    seen = {}
    with recording(lambda build, expression: seen.setdefault(expression), launch=False):
        parity_worker(rank, k, cases)
    return list(seen)


MISMATCHES = {"shape": "per-step shape", "dtype": "torch.float64", "empty": "at least 2 time steps",
              "T": "time_slice(6", "T on one rank": "time_slice(6, 1, 2)",
              "reset on one rank": "reset_net on every rank or on none"}


def mismatch_worker(rank, k):
    """Each scenario in its own layer; a mismatch is found after the headers are swapped, so the
    group stays usable for the next scenario. Both ranks must name it, also where only one rank's
    input is wrong (the other learns it from the header, not from a timeout)."""
    from spikingjelly.activation_based import functional, neuron
    import sj_temporal_fusion  # noqa: F401
    from sj_temporal_fusion.distributed import TimeShardedNode, TimeShardingError
    out = {}
    for what in MISMATCHES:
        node = TimeShardedNode(neuron.LIFNode(step_mode="m"), name=f"mismatch.{what}", timeout=20,
                               T=6 if what.startswith("T") else None)
        if what == "shape":
            x = torch.rand(3, 4, 5) if rank == 0 else torch.rand(3, 4, 6)
        elif what == "dtype":
            x = torch.rand(3, 4, dtype=torch.float32 if rank == 0 else torch.float64)
        elif what == "empty":
            x = torch.rand(3 if rank == 0 else 0, 4)
        elif what == "T":  # T=6 over 2 ranks is 3 + 3; these slices are 4 + 2
            x = torch.rand(4 if rank == 0 else 2, 4)
        elif what == "T on one rank":  # rank 0 is right, rank 1 has 2 steps instead of 3
            x = torch.rand(3 if rank == 0 else 2, 4)
        else:  # both run one call, then only rank 0 resets: rank 1 would continue the state
            x = torch.rand(3, 4)
            node(x)
            if rank == 0:
                functional.reset_net(node)
        try:
            node(x)
            out[what] = ("finished", "")
        except (TimeShardingError, ValueError) as exc:
            out[what] = (type(exc).__name__, str(exc))
    return out


def assert_mismatches_named(results: dict) -> None:
    """Every rank of a ``mismatch_worker`` group named every mismatch, with its layer, from the
    swapped headers and not from a timeout."""
    for rank, out in results.items():
        for what, needle in MISMATCHES.items():
            kind, message = out[what]
            assert kind in ("TimeShardingError", "ValueError"), f"rank {rank}, {what}: {kind} {message}"
            assert needle in message and f"mismatch.{what}" in message, (rank, what, message)
            assert "failed after" not in message, f"rank {rank}, {what}: a timeout, not the mismatch: {message}"
