"""python -m sj_temporal_fusion.bench lif: one LIF layer, the paper's Fig. 5 setting, every method
side by side in one run, with the device's copy bandwidth taken in the same run.

Fig. 5 neuron: tau = 1.25 (k_tau = 0.2), decay_input = False, v_threshold = 0.3, v_reset = 0,
Sigmoid(alpha = 4); default 1,000,000 neurons, T = 2, 4, ..., 512.

Methods (one setup each, all fed the same x (T, N) and, for 'train', the same grad (T, N)):
    temporal_fusion  LIFNode(backend='temporal_fusion'): this package's fused kernels
    torch            LIFNode(backend='torch'): 'infer' is SpikingJelly's eval mode, its TorchScript
                     multi-step loop; 'train' its per-step autograd loop over scripted helpers.
                     Both are timed only after >= 10 warm-up calls (per case for 'infer', per
                     dtype for 'train'): TorchScript's profiling executor specialises over the
                     first calls
    cupy             LIFNode(backend='cupy'), CUDA only, fp32/fp16 only. 'infer' runs the node in
                     train mode under no_grad, because SpikingJelly 0.0.0.0.14's eval mode runs the
                     TorchScript loop whatever the backend
    spikingjelly2    SpikingJelly 2.x's LIFNode on its own path (it has no backends): on the CPU its
                     per-step loop; on a GPU what it selects (native CUDA when built from source,
                     else Triton when installed, else the loop), or the one that
                     SJ_LIF_CUDA_IMPLEMENTATION=cuda|triton|torch names (read when it is imported).
                     Under 2.x, temporal_fusion is the same node after
                     sj_temporal_fusion.set_backend(node, 'temporal_fusion'); torch and cupy are
                     0.0.0.0.14's backends and are skipped there, as spikingjelly2 is under 0.0.0.0.14
    serial           a plain per-time-step PyTorch loop (the paper's "Serial (PyTorch)" baseline)
The default methods are the installed SpikingJelly's.
Modes: 'infer' (forward under no_grad) and 'train' (forward + backward of spike against grad:
``--grad random``, or ``--grad sum``, the expanded 1 that ``spike.sum().backward()`` passes).

Before timing, each method's spikes (and for 'train' its grad_x) are checked against an fp64
serial reference on the first ``--check-neurons`` neurons; a method that fails is not timed.
Every figure gets the roofline: the bytes temporal fusion must move for that step
(``traffic.step_traffic``) divided by the time, as a fraction of the measured copy bandwidth.
For the other methods the same numerator gives an *effective* bandwidth: the fraction of the
hardware limit they reach on the same work.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import versions
from . import harness, traffic

METHODS = ("temporal_fusion", "torch", "cupy", "spikingjelly2", "serial")
DEFAULT_METHODS = (("temporal_fusion", "torch", "cupy", "serial") if versions.GENERATION == 1
                   else ("temporal_fusion", "spikingjelly2", "serial"))
MODES = ("infer", "train")
FIG5 = dict(tau=1.25, decay_input=False, v_threshold=0.3, v_reset=0.0)
SG_ALPHA = 4.0
TORCHSCRIPT_WARMUP = 10
# Gross-error guard before timing (accuracy proper lives in tests/test_ops.py): fraction of
# (step, neuron) spikes that may differ from the fp64 reference. fp32 differs only where h lies
# within rounding of the threshold; SpikingJelly keeps v in fp16/bf16 for those inputs, so its
# trajectories drift from fp64 over T steps (bf16 has an 8-bit mantissa).
SPIKE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.float16: 0.05, torch.bfloat16: 0.15}
GRAD_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9, torch.float16: 0.05, torch.bfloat16: 0.15}
COLUMNS = ["method", "mode", "dtype", "T", "N", "status", "median_ms", "p25_ms", "p75_ms", "min_ms",
           "reps", "wall_median_ms", "design_bytes", "gb_per_s", "fraction_of_copy_bw", "speedup_of_temporal_fusion",
           "spike_mismatch", "grad_rel_error", "reason"]


_warmed: set = set()  # (mode, dtype) whose TorchScript training helpers have been warmed up


class Skip(Exception):
    """A method that cannot run a case here; the message says why and lands in the JSON."""


@dataclass
class Case:
    method: str
    mode: str
    dtype: torch.dtype
    T: int
    N: int
    device: torch.device


def surrogate():
    from spikingjelly.activation_based import surrogate as sj_surrogate
    return sj_surrogate.Sigmoid(alpha=SG_ALPHA)


# ---------------------------------------------------------------- the serial baseline and oracle

def serial_lif(x_seq: torch.Tensor, tau: float, v_threshold: float, v_reset: float, spike_fn,
               decay_input: bool = False) -> torch.Tensor:
    """x_seq (T, N) -> spikes (T, N): SpikingJelly's LIF (hard reset, reset not detached) as a
    plain loop over time steps, one small kernel per operation per step."""
    v = torch.full_like(x_seq[0], v_reset)
    spikes = []
    for t in range(x_seq.shape[0]):
        if decay_input:
            h = v + (x_seq[t] - (v - v_reset)) / tau
        else:
            h = v - (v - v_reset) / tau + x_seq[t]
        s = spike_fn(h - v_threshold)
        v = h * (1.0 - s) + v_reset * s
        spikes.append(s)
    return torch.stack(spikes)


def reference(x: torch.Tensor, grad: Optional[torch.Tensor]):
    """fp64 spikes, and for a given grad dL/dspike the fp64 grad_x, of the Fig. 5 layer."""
    x64 = x.detach().double().requires_grad_(grad is not None)
    with torch.set_grad_enabled(grad is not None):
        spike = serial_lif(x64, FIG5["tau"], FIG5["v_threshold"], FIG5["v_reset"], surrogate())
        if grad is None:
            return spike, None
        spike.backward(grad.double())
    return spike.detach(), x64.grad


# ---------------------------------------------------------------- one setup per method

def require_backend(backend: str) -> None:
    """Skip, saying why, a backend the installed SpikingJelly generation does not have: 0.0.0.0.14's
    'torch' / 'cupy' under 2.x, 2.x's own path 'spikingjelly2' under 0.0.0.0.14."""
    if versions.GENERATION == 1 and backend == "spikingjelly2":
        raise Skip(f"method 'spikingjelly2' needs spikingjelly 2.x, installed is {versions.VERSION} "
                   f"(./dev test-sj2's .venv-sj2 has 2.0.0)")
    if versions.GENERATION == 2 and backend not in ("temporal_fusion", "spikingjelly2"):
        raise Skip(f"SpikingJelly {versions.VERSION} has no backends ('{backend}' is 0.0.0.0.14's): its own "
                   f"path is method 'spikingjelly2'")


def _node(backend: str, device: torch.device):
    """The Fig. 5 LIFNode on ``backend``: a SpikingJelly 0.0.0.0.14 backend, or under 2.x
    'temporal_fusion' (switched by set_backend) or 'spikingjelly2' (its own path)."""
    from spikingjelly.activation_based import neuron
    import sj_temporal_fusion  # registers the backend
    require_backend(backend)
    if versions.GENERATION == 1:
        return neuron.LIFNode(**FIG5, surrogate_function=surrogate(), step_mode="m", backend=backend).to(device)
    node = neuron.LIFNode(**FIG5, surrogate_function=surrogate(), step_mode="m").to(device)
    if backend == "temporal_fusion":
        sj_temporal_fusion.set_backend(node, "temporal_fusion")
    return node


def _node_step(node, case: Case, x: torch.Tensor, grad: Optional[torch.Tensor], eval_mode: bool):
    from spikingjelly.activation_based import functional
    node.train(not eval_mode)
    if case.mode == "infer":
        def step():
            functional.reset_net(node)
            with torch.no_grad():
                return node(x)
    else:
        def step():
            functional.reset_net(node)
            x.grad = None
            spike = node(x)
            spike.backward(grad)
            return spike
    return step


def setup_temporal_fusion(case, x, grad):
    return _node_step(_node("temporal_fusion", case.device), case, x, grad, eval_mode=case.mode == "infer")


def setup_torch(case, x, grad):
    return _node_step(_node("torch", case.device), case, x, grad, eval_mode=case.mode == "infer")


def setup_spikingjelly2(case, x, grad):
    return _node_step(_node("spikingjelly2", case.device), case, x, grad, eval_mode=case.mode == "infer")


def setup_cupy(case, x, grad):
    require_backend("cupy")
    if case.device.type != "cuda":
        raise Skip("SpikingJelly's cupy backend runs on CUDA tensors only")
    if case.dtype not in (torch.float32, torch.float16):
        raise Skip(f"SpikingJelly 0.0.0.0.14's cupy LIFNode takes float32/float16 only, not {case.dtype}")
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        raise Skip(f"CuPy is not importable: {exc}") from exc
    # train mode even for 'infer' (under no_grad): SJ's eval mode would run TorchScript instead.
    # numpy.int only while SJ's cupy backend runs: its 0.0.0.0.14 uses the removed alias (compat).
    from ..compat import with_numpy_int_alias
    return with_numpy_int_alias(_node_step(_node("cupy", case.device), case, x, grad, eval_mode=False))


def setup_serial(case, x, grad):
    spike_fn = surrogate()
    args = (FIG5["tau"], FIG5["v_threshold"], FIG5["v_reset"], spike_fn)
    if case.mode == "infer":
        def step():
            with torch.no_grad():
                return serial_lif(x, *args)
    else:
        def step():
            x.grad = None
            spike = serial_lif(x, *args)
            spike.backward(grad)
            return spike
    return step


SETUPS: dict[str, Callable] = {"temporal_fusion": setup_temporal_fusion, "torch": setup_torch,
                               "cupy": setup_cupy, "spikingjelly2": setup_spikingjelly2, "serial": setup_serial}


# ---------------------------------------------------------------- running

GRADS = ("random", "sum")


def make_inputs(T: int, N: int, dtype: torch.dtype, device: torch.device, mode: str, seed: int = 0,
                grad_kind: str = "random"):
    """x (T, N) ~ 0.3 + 0.5 N(0, 1) (about a third of the neuron-steps fire at threshold 0.3), and
    for 'train' the gradient dL/dspike (T, N): ``grad_kind`` 'random', or 'sum', the gradient of
    ``spike.sum()`` as autograd passes it (a 1 expanded to (T, N), stride 0, nothing materialised);
    x requires grad in 'train'."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(T, N, generator=g) * 0.5 + 0.3).to(device=device, dtype=dtype)
    grad = None
    if mode == "train":
        x.requires_grad_(True)
        if grad_kind == "sum":
            grad = torch.ones((), dtype=dtype, device=device).expand(T, N)
        else:
            grad = torch.randn(T, N, generator=g).to(device=device, dtype=dtype)
    return x, grad


def check(step, case: Case, x: torch.Tensor, grad: Optional[torch.Tensor], ref, n_check: int) -> dict:
    """Run ``step`` once and compare with the fp64 reference on the first ``n_check`` neurons."""
    spike = step()
    ref_spike, ref_grad = ref
    got = spike.detach()[:, :n_check].double()
    mismatch = (got != ref_spike).double().mean().item()
    out = {"spike_mismatch": mismatch, "grad_rel_error": None}
    problems = []
    if mismatch > SPIKE_TOLERANCE[case.dtype]:
        problems.append(f"spike mismatch {mismatch:.2e} > {SPIKE_TOLERANCE[case.dtype]:.0e}")
    if ref_grad is not None:
        if x.grad is None:
            problems.append("no grad reached x")
        else:
            # Only neurons whose whole spike train agrees: elsewhere the trajectories differ.
            same = (got == ref_spike).all(dim=0)
            g = x.grad[:, :n_check].double()[:, same]
            r = ref_grad[:, same]
            err = ((g - r).norm() / r.norm().clamp_min(1e-30)).item() if same.any() else math.nan
            out["grad_rel_error"] = err
            if not err <= GRAD_TOLERANCE[case.dtype]:
                problems.append(f"grad_x relative error {err:.2e} > {GRAD_TOLERANCE[case.dtype]:.0e}")
    out["check_ok"] = not problems
    out["check_problems"] = problems
    return out


def run_case(case: Case, x, grad, ref, args, flush) -> dict:
    row = {"method": case.method, "mode": case.mode, "dtype": harness.DTYPE_NAMES[case.dtype],
           "T": case.T, "N": case.N}
    try:
        step = SETUPS[case.method](case, x, grad)
    except Skip as exc:
        return {**row, "status": "skipped", "reason": str(exc)}
    try:
        row.update(check(step, case, x, grad, ref, min(case.N, args.check_neurons)))
        if not row["check_ok"]:
            return {**row, "status": "check_failed", "reason": "; ".join(row["check_problems"])}
        warmup = args.warmup
        if case.method == "torch" and (case.mode == "infer" or (case.mode, case.dtype) not in _warmed):
            # TorchScript's profiling executor specialises and fuses over the first calls (CPU,
            # N = 262,144, fp16 train: ~2.8 s per call for the first 7 calls, then ~0.1 s). The
            # training loop's scripted helpers see (N,) tensors whatever T is, so once per dtype
            # suffices; the eval loop takes the whole (T, N) sequence, so every case warms up.
            warmup = max(warmup, TORCHSCRIPT_WARMUP)
            _warmed.add((case.mode, case.dtype))
        timing = harness.time_fn(step, case.device, warmup=warmup, reps=args.reps,
                                 max_seconds=args.max_seconds, flush=flush)
    except torch.cuda.OutOfMemoryError as exc:
        return {**row, "status": "error", "reason": f"out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:  # noqa: BLE001 - one failing case must not end the benchmark
        return {**row, "status": "error", "reason": error_reason(exc)}
    finally:
        if x.grad is not None:
            x.grad = None
    return {**row, "status": "ok", **timing.summary(), "samples_ms": timing.samples_ms}


def error_reason(exc: BaseException) -> str:
    """'Type: first line of the message' of a failed case, for its error row."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


def add_roofline(rows: list[dict], copy_gb_per_s: float) -> None:
    """design bytes of temporal fusion's step / time, and that as a fraction of copy bandwidth;
    and each method's time relative to temporal fusion's on the same case."""
    tf = {(r["mode"], r["dtype"], r["T"]): r for r in rows
          if r["method"] == "temporal_fusion" and r["status"] == "ok"}
    for r in rows:
        design = traffic.step_traffic(r["mode"], r["T"], r["N"], harness.DTYPES[r["dtype"]], "lif").total
        r["design_bytes"] = design
        if r["status"] != "ok":
            continue
        r["gb_per_s"] = design / (r["median_ms"] / 1e3) / 1e9
        r["fraction_of_copy_bw"] = r["gb_per_s"] / copy_gb_per_s
        base = tf.get((r["mode"], r["dtype"], r["T"]))
        if base is not None:
            r["speedup_of_temporal_fusion"] = r["median_ms"] / base["median_ms"]


# ---------------------------------------------------------------- plots

def plot(rows: list[dict], out: Path, name: str, title: str) -> list[Path]:
    plt = harness.pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    dtypes = [d for d in harness.DTYPES if any(r["dtype"] == d for r in ok)]
    methods = [m for m in METHODS if any(r["method"] == m for r in ok)]
    if not ok:
        return []
    style = {"temporal_fusion": ("C3", "o", "temporal fusion (ours)"), "torch": ("C0", "s", "SpikingJelly torch"),
             "cupy": ("C2", "^", "SpikingJelly cupy"), "spikingjelly2": ("C1", "v", "SpikingJelly 2 (own path)"),
             "serial": ("C7", "D", "serial PyTorch")}
    paths = []
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    # Label the minor ticks 2 and 5 of each decade only, so log axes read as plain numbers.
    plain_minor = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")

    def grid(kind: str):
        fig, axes = plt.subplots(len(modes), len(dtypes), figsize=(4.2 * len(dtypes), 3.4 * len(modes)),
                                 squeeze=False)
        for i, mode in enumerate(modes):
            for j, dtype in enumerate(dtypes):
                ax = axes[i][j]
                for method in methods:
                    sel = sorted((r for r in ok if (r["mode"], r["dtype"], r["method"]) == (mode, dtype, method)),
                                 key=lambda r: r["T"])
                    if kind == "speedup":
                        sel = [r for r in sel if method != "temporal_fusion" and r.get("speedup_of_temporal_fusion")]
                    if not sel:
                        continue
                    color, marker, label = style[method]
                    Ts = [r["T"] for r in sel]
                    if kind == "time":
                        ys = [r["median_ms"] for r in sel]
                        ax.errorbar(Ts, ys, yerr=[[y - r["p25_ms"] for y, r in zip(ys, sel)],
                                                  [r["p75_ms"] - y for y, r in zip(ys, sel)]],
                                    color=color, marker=marker, ms=4, capsize=2, label=label)
                    else:
                        ax.plot(Ts, [r["speedup_of_temporal_fusion"] for r in sel], color=color,
                                marker=marker, ms=4, label=f"vs {label}")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain_minor)
                if kind == "speedup":
                    ax.axhline(1.0, color="k", lw=0.6)
                ax.set_title(f"{mode}, {dtype}", fontsize=10)
                ax.set_xlabel("time steps T")
                ax.set_ylabel("time per layer call (ms)" if kind == "time" else "speedup of temporal fusion (x)")
                ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        for row_axes in axes:
            for ax in row_axes:
                h, l = ax.get_legend_handles_labels()
                for hh, ll in zip(h, l):
                    if ll not in labels:
                        handles.append(hh)
                        labels.append(ll)
        fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize=9)
        paths.append(harness.save_figure(fig, out / f"{name}_{kind}.png", title, rect=(0, 0.06, 1, 0.95)))

    grid("time")
    if any(r.get("speedup_of_temporal_fusion") for r in ok if r["method"] != "temporal_fusion"):
        grid("speedup")

    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 3.6), squeeze=False)
    for i, mode in enumerate(modes):
        ax = axes[0][i]
        for j, dtype in enumerate(dtypes):
            sel = sorted((r for r in ok if (r["mode"], r["dtype"], r["method"]) == (mode, dtype, "temporal_fusion")),
                         key=lambda r: r["T"])
            if sel:
                ax.plot([r["T"] for r in sel], [r["fraction_of_copy_bw"] for r in sel], marker="o", ms=4,
                        color=f"C{j}", label=f"temporal fusion {dtype}")
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="measured copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, max(1.1, ax.get_ylim()[1]))
        ax.set_title(f"{mode}: design bytes / time", fontsize=10)
        ax.set_xlabel("time steps T")
        ax.set_ylabel("fraction of copy bandwidth")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    paths.append(harness.save_figure(fig, out / f"{name}_roofline.png", title))
    return paths


# ---------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--neurons", type=int, default=1_000_000, help="neurons N (default 1,000,000, Fig. 5)")
    p.add_argument("--T", default="2..512", help="time steps: '2..512' (powers of two) or '2,8,32'")
    p.add_argument("--modes", default="infer,train", help="infer,train")
    p.add_argument("--dtypes", default="fp32,fp16,bf16", help="fp32,fp16,bf16 (fp64 also accepted)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"{','.join(METHODS)} (default: the installed SpikingJelly's, {','.join(DEFAULT_METHODS)})")
    p.add_argument("--grad", choices=GRADS, default="random",
                   help="train: dL/dspike random (default), or sum: that of spike.sum() (an expanded 1)")
    p.add_argument("--reps", type=int, default=30, help="repetitions per case, at most (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per case (torch infer: >= 10)")
    p.add_argument("--max-seconds", type=float, default=3.0,
                   help="stop repeating a case after this much measured time, once 3 reps are in")
    p.add_argument("--check-neurons", type=int, default=65536,
                   help="neurons checked against the fp64 reference before timing")
    p.add_argument("--no-flush", action="store_true", help="keep caches warm between repetitions")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="redraw the plots of an earlier run's JSON (into --out) and exit")


def main(args) -> dict:
    if args.replot:
        payload = json.loads(Path(args.replot).read_text())
        name = args.name or Path(args.replot).stem
        env, n = payload["environment"], payload["config"]["neurons"]
        payload["plots"] = [str(p) for p in plot(payload["results"], Path(args.out), name,
                                                 f"LIF layer, N={n:,}, {env['device_name']}")]
        print("wrote " + ", ".join(payload["plots"]))
        return payload
    device = harness.resolve_device(args.device)
    Ts = harness.parse_ints(args.T)
    modes = harness.parse_names(args.modes, MODES, "mode")
    dtypes = [harness.DTYPES[d] for d in harness.parse_names(args.dtypes, harness.DTYPES, "dtype")]
    methods = harness.parse_names(args.methods, METHODS, "method")
    N = args.neurons
    _warmed.clear()
    env = harness.environment(device)
    env["cpu_allocator"] = getattr(args, "cpu_allocator_setting", None)
    copy_start = harness.copy_bandwidth(device)
    flush = harness.CacheFlusher(device, enabled=not args.no_flush)
    config = {"neurons": N, "T": Ts, "modes": modes, "dtypes": [harness.DTYPE_NAMES[d] for d in dtypes],
              "methods": methods, "neuron": {**FIG5, "surrogate": f"Sigmoid(alpha={SG_ALPHA})"},
              "grad": args.grad, "reps": args.reps, "warmup": args.warmup, "torchscript_warmup": TORCHSCRIPT_WARMUP,
              "max_seconds": args.max_seconds, "check_neurons": args.check_neurons,
              "flush_caches": not args.no_flush, "flush_bytes": harness.flush_bytes(device),
              "sj_lif_cuda_implementation": os.environ.get("SJ_LIF_CUDA_IMPLEMENTATION", "auto"),
              "timer": ("CUDA events (kernel) + perf_counter to completion (wall), synchronised "
                        "before each call" if device.type == "cuda" else "time.perf_counter")}
    name = args.name or f"lif-{device.type}"
    out = Path(args.out)

    def write(rows: list[dict], copy_gb_per_s: float, copy_end, complete: bool) -> dict:
        # Written after every case: a run cut short (a crash, a time budget) keeps what finished.
        rows = [dict(r) for r in rows]
        add_roofline(rows, copy_gb_per_s)
        payload = {"benchmark": "lif", "complete": complete, "environment": env, "config": config,
                   "copy_bandwidth": {"gb_per_s": copy_gb_per_s, "start": copy_start, "end": copy_end},
                   "design_bytes_per_neuron_step": {
                       f"{mode}/{harness.DTYPE_NAMES[d]}": traffic.words_per_neuron_step(mode, d, "lif")
                       for mode in modes for d in dtypes},
                   "results": rows}
        harness.write_json(out / f"{name}.json", payload)
        harness.write_csv(out / f"{name}.csv", rows, COLUMNS)
        return payload

    rows = []
    cases = [(mode, dtype, T) for mode in modes for dtype in dtypes for T in Ts]
    bar = harness.progress(len(cases) * len(methods), "lif", enabled=not args.quiet)
    for mode, dtype, T in cases:
        try:
            x, grad = make_inputs(T, N, dtype, device, mode, grad_kind=args.grad)
            n_check = min(N, args.check_neurons)
            ref = reference(x[:, :n_check], None if grad is None else grad[:, :n_check])
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for the inputs of a large T
            for method in methods:
                rows.append({"method": method, "mode": mode, "dtype": harness.DTYPE_NAMES[dtype], "T": T,
                             "N": N, "status": "error", "reason": f"inputs: {error_reason(exc)}"})
                bar.update(1)
            write(rows, copy_start["gb_per_s"], None, complete=False)
            continue
        for method in methods:
            bar.set_postfix_str(f"{method} {mode} {harness.DTYPE_NAMES[dtype]} T={T}")
            rows.append(run_case(Case(method, mode, dtype, T, N, device), x, grad, ref, args, flush))
            write(rows, copy_start["gb_per_s"], None, complete=False)
            bar.update(1)
        del x, grad, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    copy_end = harness.copy_bandwidth(device)
    # The larger of the two readings: a conservative denominator for the roofline.
    copy_gb_per_s = max(copy_start["gb_per_s"], copy_end["gb_per_s"])
    harness.finish_environment(env)
    payload = write(rows, copy_gb_per_s, copy_end, complete=True)
    rows = payload["results"]
    if not args.no_plots:
        title = f"LIF layer, N={N:,}, {env['device_name']}"
        payload["plots"] = [str(p) for p in plot(rows, out, name, title)]
    print_table(rows, copy_gb_per_s)
    print(f"wrote {out / (name + '.json')}, {out / (name + '.csv')}" +
          (f", {len(payload.get('plots', []))} plots" if not args.no_plots else ""))
    return payload


def print_table(rows: list[dict], copy_gb_per_s: float) -> None:
    print(f"copy bandwidth {copy_gb_per_s:.1f} GB/s")
    print(f"{'mode':<6}{'dtype':<6}{'T':>5}  {'method':<16}{'median ms':>11}{'IQR ms':>16}"
          f"{'x tf':>8}{'GB/s':>8}{'of copy':>9}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['mode']:<6}{r['dtype']:<6}{r['T']:>5}  {r['method']:<16}{r['status']}: {r.get('reason', '')}")
            continue
        iqr = f"{r['p25_ms']:.3g}-{r['p75_ms']:.3g}"
        sp = r.get("speedup_of_temporal_fusion")
        print(f"{r['mode']:<6}{r['dtype']:<6}{r['T']:>5}  {r['method']:<16}{r['median_ms']:>11.3f}{iqr:>16}"
              f"{(f'{sp:.2f}' if sp else '-'):>8}{r['gb_per_s']:>8.1f}{r['fraction_of_copy_bw']:>9.2f}")
