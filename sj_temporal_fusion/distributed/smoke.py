"""Single-GPU smoke run of time sharding over NCCL (NCCL refuses two ranks on one GPU, so this is
what one GPU can show; docs/time_sharding.md lists what needs two or more).

    python -m sj_temporal_fusion.distributed.smoke            # a GPU
    # two or more GPUs, one process each (what one GPU cannot show):
    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        -m sj_temporal_fusion.distributed.smoke --ranks
    # in a checkout, the same stages on the CPU with NCCL emulated (test code, not installed):
    python tests/_smoke_on_cpu.py [--ranks under torchrun]

Stages (``run`` returns one record per stage; ``./dev gpu`` calls the command):
  1. the shard kernels on CUDA against the host build: forward and fix-up, bit for bit, for
     IF/LIF/PLIF x hard/soft reset x fp32/fp16/bf16/fp64 (skipped on the CPU);
  2. a one-rank CuPy NCCL communicator sending to and receiving from itself, fp32 / bf16 / fp64,
     N = 4M, bit for bit;
  3. a receive from itself with no send to itself in its group: NCCL refuses it at once
     (ncclInvalidUsage), and the transport must raise ``TimeShardingError`` saying so, not hang
     and not return. A receive that waits and then times out needs a peer that never sends, so
     a second rank, so a second GPU: the ``--ranks`` run and the CPU tests cover that;
  4. a one-rank ``TimeShardedNode`` forward and backward against the single-device result.
Every stage runs with DeprecationWarning as an error (CuPy 14 deprecates APIs CuPy 13 had); the
imports before them do not, since torch 2.11 deprecates SpikingJelly 0.0.0.0.14's @torch.jit.script.
``run``, ``run_ranks`` and ``main`` take ``make_nccl(device, timeout)``, the maker of the CuPy NCCL
transport; the CPU run passes an emulation of NCCL's rules there, bounded by the same watchdog.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .cuda_streams import indexed
from .transport import Transport

N_DEFAULT = 4 * 1024 * 1024
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def _same_bits(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(_bits(a.cpu()), _bits(b.cpu()))


MakeNccl = Callable[[torch.device, float], Transport]  # (device, set-up timeout) -> the CuPy NCCL transport


def cupy_nccl(device: torch.device, timeout: float):
    """The CuPy NCCL transport of a one-rank default group on ``device``."""
    from .nccl_transport import NcclTransport
    return NcclTransport(None, device, timeout)


def _device(name: Optional[str], make_nccl: Optional[MakeNccl]) -> torch.device:
    """The device the run uses, with its index (``torch.cuda.set_device`` refuses one without)."""
    dev = torch.device(name or "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("smoke: no CUDA device here; in a checkout, tests/_smoke_on_cpu.py runs what a "
                         "CPU can, with NCCL emulated")
    if dev.type != "cuda" and make_nccl is None:
        raise SystemExit(f"smoke: --device {dev} has no NCCL; pass make_nccl (tests/_smoke_on_cpu.py "
                         f"passes an emulation of NCCL's rules)")
    return indexed(dev)


def _ensure_group(device: torch.device) -> None:
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


# ---------------------------------------------------------------- stages

def stage_kernels(device: torch.device, n: int, make_nccl: MakeNccl) -> str:
    if device.type != "cuda":
        raise _Skip("needs a CUDA device (the host build is the reference)")
    return compare_kernels(device)


def compare_kernels(device: torch.device) -> str:
    """The shard kernels on ``device`` against the host build, forward and fix-up, bit for bit
    (on the CPU this compares the host build with itself: the CI checks the calls, not the GPU)."""
    from . import kernels
    T, N = 37, 4099  # T off the 16-step checkpoint grid; N not a multiple of a warp or a block
    checked = 0
    for kind in ("if", "lif", "plif"):
        for v_reset in (0.0, None):
            for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                g = torch.Generator().manual_seed(checked)
                x = (torch.randn(T, N, generator=g) * 0.7 + 0.3).to(dtype)
                w = torch.tensor(-0.4)
                spec = kernels.NeuronSpec.from_options(model="lif", kind=kind, tau=1.7, w=w, decay_input=False,
                                                       v_threshold=0.4, v_reset=v_reset)
                outs = []
                for dev in (torch.device("cpu"), device):
                    xd = x.to(dev)
                    params = kernels.neuron_parameters(dict(model="lif", kind=kind, tau=1.7, w=w.to(dev),
                                                            decay_input=False, v_threshold=0.4,
                                                            v_reset=v_reset), xd)[0]
                    acc = torch.float64 if dtype == torch.float64 else torch.float32
                    guess = torch.full((N,), v_reset or 0.0, dtype=acc, device=dev)
                    true_v = (torch.randn(N, generator=torch.Generator().manual_seed(99)) * 0.3).to(acc).to(dev)
                    spike, v_last, v_seq, ckpt = kernels.shard_forward(xd, guess, spec, params, True, True)
                    fwd = [t.clone() for t in (spike, v_last, v_seq, ckpt)]
                    fix_len = kernels.shard_fixup(xd, true_v, ckpt, spike, v_seq, v_last, spec, params)
                    outs.append(fwd + [spike, v_last, v_seq, ckpt, fix_len])
                names = ["forward spike", "forward v_last", "forward v_seq", "forward checkpoints",
                         "fixed-up spike", "fixed-up v_last", "fixed-up v_seq", "fixed-up checkpoints",
                         "fix-up length"]
                for name, a, b in zip(names, outs[0], outs[1]):
                    if not _same_bits(a, b):
                        raise AssertionError(f"{kind}, v_reset={v_reset}, {dtype}: {name} differs "
                                             f"between CUDA and the host build")
                checked += 1
    return f"{checked} configurations, forward and fix-up bit for bit (T={T}, N={N})"


def stage_send_recv_self(device: torch.device, n: int, make_nccl: MakeNccl) -> str:
    t = make_nccl(device, 60.0)
    try:
        done = []
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            x = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
            y = torch.full_like(x, float("nan"))
            start = time.monotonic()
            t.exchange([(x, 0, f"smoke: {dtype} to itself")], [(y, 0, f"smoke: {dtype} from itself")],
                       0, 60.0, complete=True)
            if not _same_bits(x, y):
                raise AssertionError(f"{dtype}: what rank 0 received from itself differs from what it sent")
            done.append(f"{str(dtype)[6:]} {time.monotonic() - start:.3f} s")
        return f"N={n:,}: " + ", ".join(done)
    finally:
        t.close()


def stage_self_receive_refused(device: torch.device, n: int, make_nccl: MakeNccl,
                               timeout: float = 20.0) -> str:
    """NCCL refuses a receive from the rank itself without a send to itself in the same group at
    once (ncclInvalidUsage at ncclGroupEnd). It must come back as a ``TimeShardingError`` that
    says NCCL refused the call, well before the timeout, never as a hang or a return."""
    from .errors import TimeShardingError
    t = make_nccl(device, 60.0)
    try:
        buf = torch.empty(1024, device=device)
        start = time.monotonic()
        try:
            t.exchange([], [(buf, 0, "smoke: a receive from itself with no send")], 0, timeout, complete=True)
        except TimeShardingError as exc:
            waited = time.monotonic() - start
            if "NCCL refused" not in str(exc):
                raise AssertionError(f"after {waited:.1f} s, an error other than NCCL's refusal: {exc}") from exc
            if waited >= timeout / 2:  # the refusal is immediate; a wait means NCCL queued the receive
                raise AssertionError(f"refused only after {waited:.1f} s (timeout {timeout:g} s): {exc}") from exc
            return f"refused after {waited:.3f} s: {str(exc)[:160]}..."
        raise AssertionError("a receive from itself with no send returned instead of raising")
    finally:
        t.close()


def stage_one_rank_node(device: torch.device, n: int, make_nccl: MakeNccl) -> str:
    """Through the engine ``transport_for`` picks on a GPU; on the CPU through ``make_nccl``'s."""
    from spikingjelly.activation_based import neuron
    import sj_temporal_fusion  # noqa: F401  (the backend)
    from . import TimeShardedNode
    from .registry import _forget_transports, use_transport
    if device.type != "cuda":
        use_transport(make_nccl(device, 60.0), device)
    report = []
    try:
        for dtype, rtol, atol in ((torch.float32, 1e-5, 1e-6), (torch.bfloat16, 2e-2, 1e-2)):
            T, N = 37, min(n, 1 << 16)
            g = torch.Generator().manual_seed(5)
            x = (torch.randn(T, N, generator=g) * 0.6 + 0.25).to(dtype).to(device)
            options = dict(tau=1.25, decay_input=False, v_threshold=0.3, step_mode="m", store_v_seq=True)
            ref = neuron.LIFNode(backend="temporal_fusion", **options)
            node = TimeShardedNode(neuron.LIFNode(**options), T=T, name=f"smoke {dtype}", timeout=60)
            x_ref, x_loc = x.clone().requires_grad_(), x.clone().requires_grad_()
            s_ref, s = ref(x_ref), node(x_loc)
            g_out = torch.randn(x.shape, generator=g).to(dtype).to(device)
            (s_ref * g_out).sum().backward()
            (s * g_out).sum().backward()
            for name, a, b in (("spikes", s, s_ref), ("v", node.v, ref.v), ("v_seq", node.v_seq, ref.v_seq)):
                if not _same_bits(a.detach().to(dtype), b.detach().to(dtype)):
                    raise AssertionError(f"{dtype}: {name} of the one-rank node differ from one device")
            if not torch.allclose(x_loc.grad.double(), x_ref.grad.double(), rtol=rtol, atol=atol):
                err = (x_loc.grad.double() - x_ref.grad.double()).abs().max().item()
                raise AssertionError(f"{dtype}: grad_x differs by {err:.3g}")
            report.append(f"{str(dtype)[6:]} ok")
    finally:
        _forget_transports()
    return f"T=37, N={min(n, 1 << 16):,}: " + ", ".join(report)


class _Skip(Exception):
    pass


STAGES: list[tuple[str, Callable]] = [
    ("shard kernels: CUDA vs host build", stage_kernels),
    ("one-rank NCCL communicator: send/recv to itself", stage_send_recv_self),
    ("receive from itself without a send: refused at once", stage_self_receive_refused),
    ("one-rank TimeShardedNode vs one device", stage_one_rank_node),
]


def run(device: Optional[str] = None, n: int = N_DEFAULT, make_nccl: Optional[MakeNccl] = None,
        log: Callable[[str], None] = print) -> dict:
    """Run every stage with DeprecationWarning as an error on ``device`` (default: the current
    CUDA device; another needs ``make_nccl``). Returns {"ok", "device", "emulated", "stages":
    [{"name", "status": passed | failed | skipped, "detail", "seconds"}]}."""
    dev = _device(device, make_nccl)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    _ensure_group(dev)
    make = make_nccl or cupy_nccl
    stages = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name, fn in STAGES:
            start = time.monotonic()
            try:
                status, detail = "passed", fn(dev, n, make)
            except _Skip as exc:
                status, detail = "skipped", str(exc)
            except Exception as exc:  # reported, and the run fails
                status, detail = "failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            stages.append(dict(name=name, status=status, detail=detail,
                               seconds=round(time.monotonic() - start, 3)))
            log(f"[{status:7s}] {name} ({stages[-1]['seconds']:.1f} s): {detail.splitlines()[0] if detail else ''}")
    return dict(ok=all(s["status"] != "failed" for s in stages), device=str(dev), emulated=make_nccl is not None,
                torch=torch.__version__, stages=stages)


# ---------------------------------------------------------------- two or more ranks (torchrun)

def _use_engine(engine: str, device: torch.device, make_nccl: Optional[MakeNccl]) -> None:
    """Route this device's time sharding through ``engine``: 'torch' (torch.distributed's group)
    or 'cupy' (CuPy's NCCL communicator, or on the CPU ``make_nccl``'s transport)."""
    from .registry import _forget_transports, use_transport
    from .torch_transport import TorchTransport
    _forget_transports()
    if device.type != "cuda":
        use_transport(TorchTransport(None, device) if engine == "torch" else make_nccl(device, 60.0), device)
    else:
        os.environ["SJ_TF_SHARD_TRANSPORT"] = engine


def ranks_parity(device: torch.device, engine: str) -> str:
    """Every rank: its slice of a LIF layer, forward and backward, against the whole sequence
    run on its own device, in four dtypes; then calls that continue the state while the slice
    lengths change (T 9 -> 10 -> 13), which only some ranks' shapes follow."""
    from spikingjelly.activation_based import neuron
    import sj_temporal_fusion  # noqa: F401
    from . import TimeShardedNode, time_slice
    rank, k = dist.get_rank(), dist.get_world_size()
    N = 1 << 16 if device.type == "cuda" else 4099
    for dtype, rtol, atol in ((torch.float32, 1e-5, 1e-6), (torch.float64, 1e-12, 1e-13),
                              (torch.float16, 1e-2, 1e-3), (torch.bfloat16, 2e-2, 1e-2)):
        T = 4 * k + 1
        g = torch.Generator().manual_seed(3)
        x = (torch.randn(T, N, generator=g) * 0.6 + 0.25).to(dtype).to(device)
        options = dict(tau=1.25, decay_input=False, v_threshold=0.3, step_mode="m")
        ref = neuron.LIFNode(backend="temporal_fusion", **options)
        node = TimeShardedNode(neuron.LIFNode(**options), T=T, name=f"ranks {engine} {dtype}", timeout=60)
        mine = time_slice(T, rank, k)
        x_ref, x_loc = x.clone().requires_grad_(), x[mine].clone().requires_grad_()
        s_ref, s = ref(x_ref), node(x_loc)
        s_ref.sum().backward()
        s.sum().backward()
        if not _same_bits(s.detach(), s_ref[mine].detach()):
            raise AssertionError(f"rank {rank}, {dtype}: spikes differ from one device")
        if not torch.allclose(x_loc.grad.double(), x_ref.grad[mine].double(), rtol=rtol, atol=atol):
            raise AssertionError(f"rank {rank}, {dtype}: grad_x differs from one device")
    ref = neuron.LIFNode(backend="temporal_fusion", step_mode="m", tau=1.5, v_threshold=0.4)
    node = TimeShardedNode(neuron.LIFNode(step_mode="m", tau=1.5, v_threshold=0.4), name=f"ranks {engine} T")
    for T in (9, 10, 13, 10):
        x = (torch.randn(T, N, generator=torch.Generator().manual_seed(T)) * 0.6 + 0.3).to(device)
        with torch.no_grad():
            want, got = ref(x), node(x[time_slice(T, rank, k)])
        if not _same_bits(got, want[time_slice(T, rank, k)]):
            raise AssertionError(f"rank {rank}: after the slice lengths changed to T={T}, spikes differ")
    return f"k={k}, N={N:,}: fp32/fp64/fp16/bf16 forward bitwise and backward; T 9 -> 10 -> 13 -> 10 bitwise"


def ranks_mismatch(device: torch.device, engine: str) -> str:
    """Rank 1's per-step shape differs: every rank must raise a clear error, none may time out."""
    from spikingjelly.activation_based import neuron
    from . import TimeShardedNode, TimeShardingError
    rank = dist.get_rank()
    node = TimeShardedNode(neuron.LIFNode(step_mode="m"), name=f"ranks {engine} mismatch", timeout=30)
    x = torch.rand(3, 4, 5 if rank != 1 else 6, device=device)
    try:
        node(x)
    except TimeShardingError as exc:
        if rank <= 2 and "per-step shape" not in str(exc):
            raise AssertionError(f"rank {rank} did not name the per-step shape: {exc}") from exc
        return f"rank {rank}: {str(exc)[:90]}..."
    raise AssertionError(f"rank {rank} went on although rank 1's per-step shape differs")


def run_ranks(device: Optional[str] = None, make_nccl: Optional[MakeNccl] = None,
              log: Callable[[str], None] = print) -> dict:
    """Under torchrun: each process takes cuda:LOCAL_RANK (or ``device``, which on the CPU needs
    ``make_nccl``) and runs the parity and mismatch stages through each transport engine. Every
    rank returns all ranks' records, gathered."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(device or f"cuda:{local}", make_nccl)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    stages = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for engine in ("torch", "cupy"):
            for name, fn in ((f"parity over {engine}", ranks_parity), (f"mismatch over {engine}", ranks_mismatch)):
                start = time.monotonic()
                try:
                    _use_engine(engine, device, make_nccl)
                    status, detail = "passed", fn(device, engine)
                except Exception as exc:  # reported, and the run fails
                    status, detail = "failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                stages.append(dict(name=name, rank=dist.get_rank(), status=status, detail=detail,
                                   seconds=round(time.monotonic() - start, 3)))
                log(f"rank {dist.get_rank()} [{status:7s}] {name}: {detail.splitlines()[0]}")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stages)
    records = [r for per_rank in gathered for r in per_rank]
    return dict(ok=all(r["status"] != "failed" for r in records), device=str(device),
                emulated=make_nccl is not None, ranks=dist.get_world_size(), torch=torch.__version__, stages=records)


def leave_group() -> None:
    """Flush and close the transports, then destroy the process group. Exiting without it can
    abort the process: a gloo worker thread that frees a finished collective's tensors after the
    interpreter began shutting down cannot take the GIL, and its forced unwind ends in
    std::terminate (torch 2.14: 7 of 20 two-rank runs that exit right after all_gather_object)."""
    from .registry import close_transports
    close_transports()
    dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End the command's process without the interpreter's teardown, once everything is written:
    after leave_group a torch-owned worker thread can still try to take the GIL during teardown,
    and CPython then unwinds it through C++ that cannot be unwound: std::terminate, and a run whose
    every stage passed exits with SIGABRT (seen once in a CI run of 1,400 tests, two ranks, torch
    2.14). Nothing of ours is left to clean up by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None, make_nccl: Optional[MakeNccl] = None) -> int:
    """The command; ``make_nccl`` as in ``run`` (tests/_smoke_on_cpu.py passes the emulation)."""
    p = argparse.ArgumentParser(prog="python -m sj_temporal_fusion.distributed.smoke", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=N_DEFAULT, help="elements per send/recv (default 4M)")
    p.add_argument("--device", default=None, help="default: the current CUDA device (cuda:LOCAL_RANK with --ranks)")
    p.add_argument("--json", default=None, help="also write the result as JSON here (rank 0)")
    p.add_argument("--ranks", action="store_true", help="under torchrun: the stages that need 2+ ranks")
    args = p.parse_args(argv)
    joined = not dist.is_initialized()
    result = run_ranks(args.device, make_nccl) if args.ranks else run(args.device, args.n, make_nccl)
    rank = dist.get_rank()  # both runs join a group when there is none
    if joined:
        leave_group()
    try:
        import cupy
        result["cupy"] = cupy.__version__
    except ImportError:
        result["cupy"] = None
    if args.json and rank == 0:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    failed = [s for s in result["stages"] if s["status"] == "failed"]
    for s in failed:
        print(f"\nFAILED: {s['name']}\n{s['detail']}", file=sys.stderr)
    print("smoke: " + ("passed" if result["ok"] else f"{len(failed)} stage(s) failed"))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    exit_process(main())
