"""python -m sj_temporal_fusion.bench memory: peak memory of one training step (forward +
backward) per method, for one LIF layer (the Fig. 5 neuron) and for Spiking-ResNet18.

What is measured, above what is live when the step starts (model, input, grad of the output):
    CUDA  torch.cuda.max_memory_allocated() after reset_peak_memory_stats(): the caching
          allocator's peak of bytes in live tensors (not what it reserves from the driver).
    CPU   the peak of the running sum of the allocation and free events that torch's profiler
          records (profile_memory=True): the same quantity, bytes in live tensors of torch's CPU
          allocator. Process RSS is not used: glibc keeps freed pages, so RSS deltas mix steps.
          If the profiler's event tree is unavailable the figure is reported as null.
One unmeasured step runs first, so one-off allocations (kernel caches, TorchScript) are not
counted, and its gradients are dropped before the measured step.

Spiking-ResNet18: SpikingJelly's ``spiking_resnet18`` with LIFNode(tau=2, detach_reset=True,
Sigmoid(alpha=4)) in multi-step mode, input (T, B, 3, H, W), cross-entropy on the mean over T.
Methods: the SpikingJelly backends ``temporal_fusion``, ``torch``, ``cupy`` (CUDA), and for the
single layer also ``serial`` (the hand-written loop of ``bench.lif``; it is not a backend).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional

import torch

from . import harness, lif

MODELS = ("lif", "resnet18")
METHODS = lif.METHODS
COLUMNS = ["model", "method", "dtype", "T", "size", "status", "peak_bytes", "peak_mib",
           "ratio_to_temporal_fusion", "measure", "reason"]


def peak_cuda(step: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_cpu(step: Callable[[], object]) -> Optional[int]:
    """Peak of live bytes allocated by torch on the CPU during ``step``, from the profiler's
    allocation events (None when this torch build does not expose them)."""
    from torch.profiler import ProfilerActivity, profile
    try:
        from torch._C._profiler import _EventType
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError:
        return None
    events, stack = [], list(roots)
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation:
            fields = node.typed[1]
            if fields.device.type == "cpu":
                events.append((node.start_time_ns, fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def measure(step: Callable[[], object], device: torch.device) -> tuple[Optional[int], str]:
    step()  # unmeasured first step
    # Gradients of the first step are dropped outside the measured window: the profiler cannot see
    # the free of a block allocated before it started, so it would count them twice.
    step.clear()
    if device.type == "cuda":
        return peak_cuda(step, device), "torch.cuda.max_memory_allocated"
    return peak_cpu(step), "torch profiler allocation events (CPU allocator)"


# ---------------------------------------------------------------- setups

def setup_lif(method: str, device, dtype, T: int, size: int):
    case = lif.Case(method, "train", dtype, T, size, device)
    x, grad = lif.make_inputs(T, size, dtype, device, "train")
    step = lif.SETUPS[method](case, x, grad)

    def clear():
        x.grad = None
    step.clear = clear
    return step


def setup_resnet18(method: str, device, dtype, T: int, batch: int, image_size: int = 32):
    if method == "serial":
        raise lif.Skip("'serial' is the hand-written single-layer loop, not a SpikingJelly backend")
    if method == "cupy":
        lif.setup_cupy(lif.Case(method, "train", dtype, T, 1, device), None, None)  # raises Skip
    from spikingjelly.activation_based import functional, neuron
    from spikingjelly.activation_based.model import spiking_resnet
    if method == "temporal_fusion":
        import sj_temporal_fusion  # noqa: F401 - registers the backend
    torch.manual_seed(0)
    net = spiking_resnet.spiking_resnet18(spiking_neuron=neuron.LIFNode, tau=2.0, detach_reset=True,
                                          surrogate_function=lif.surrogate(), num_classes=10)
    functional.set_step_mode(net, "m")
    functional.set_backend(net, method, neuron.LIFNode)
    if not all(m.backend == method for m in net.modules() if isinstance(m, neuron.LIFNode)):
        raise lif.Skip(f"LIFNode of this SpikingJelly does not take backend={method!r}")
    net = net.to(device=device, dtype=dtype).train()
    x = torch.rand(T, batch, 3, image_size, image_size, device=device, dtype=dtype)
    label = torch.randint(0, 10, (batch,), device=device)

    def step():
        functional.reset_net(net)
        net.zero_grad(set_to_none=True)
        out = net(x).mean(0)
        torch.nn.functional.cross_entropy(out.float(), label).backward()
    if method == "cupy":  # numpy.int only while SJ's cupy backend runs (compat)
        from ..compat import with_numpy_int_alias
        step = with_numpy_int_alias(step)
    step.net = net
    step.clear = lambda: net.zero_grad(set_to_none=True)
    return step


# ---------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(MODELS), help="lif,resnet18")
    p.add_argument("--methods", default=",".join(lif.DEFAULT_METHODS), help=",".join(METHODS))
    p.add_argument("--dtypes", default="fp32", help="fp32,fp16,bf16 (default fp32)")
    p.add_argument("--T", type=int, default=32, help="time steps (default 32, Table 1)")
    p.add_argument("--neurons", type=int, default=1_000_000, help="LIF layer size (default 1,000,000)")
    p.add_argument("--batch", type=int, default=32, help="Spiking-ResNet18 batch (default 32)")
    p.add_argument("--image-size", type=int, default=32, help="Spiking-ResNet18 input H = W (default 32)")


def main(args) -> dict:
    device = harness.resolve_device(args.device)
    models = harness.parse_names(args.models, MODELS, "model")
    methods = harness.parse_names(args.methods, METHODS, "method")
    dtypes = [harness.DTYPES[d] for d in harness.parse_names(args.dtypes, harness.DTYPES, "dtype")]
    env = harness.environment(device)
    env["cpu_allocator"] = getattr(args, "cpu_allocator_setting", None)
    config = {"models": models, "methods": methods, "dtypes": [harness.DTYPE_NAMES[d] for d in dtypes],
              "T": args.T, "neurons": args.neurons, "batch": args.batch,
              "image_size": args.image_size, "lif_neuron": lif.FIG5,
              "resnet18_neuron": {"tau": 2.0, "detach_reset": True,
                                  "surrogate": f"Sigmoid(alpha={lif.SG_ALPHA})"}}
    name = args.name or f"memory-{device.type}"
    out = Path(args.out)

    def write(rows: list[dict], complete: bool) -> dict:
        # Written after every case: a run cut short keeps what finished.
        rows = [dict(r) for r in rows]
        base = {(r["model"], r["dtype"]): r["peak_bytes"] for r in rows
                if r["method"] == "temporal_fusion" and r.get("peak_bytes")}
        for r in rows:
            b = base.get((r["model"], r["dtype"]))
            if r.get("peak_bytes") and b:
                r["ratio_to_temporal_fusion"] = r["peak_bytes"] / b
        payload = {"benchmark": "memory", "complete": complete, "environment": env, "config": config,
                   "results": rows}
        harness.write_json(out / f"{name}.json", payload)
        harness.write_csv(out / f"{name}.csv", rows, COLUMNS)
        return payload

    rows = []
    cases = [(m, d, meth) for m in models for d in dtypes for meth in methods]
    bar = harness.progress(len(cases), "memory", enabled=not args.quiet)
    for model, dtype, method in cases:
        size = args.neurons if model == "lif" else args.batch
        row = {"model": model, "method": method, "dtype": harness.DTYPE_NAMES[dtype], "T": args.T, "size": size}
        bar.set_postfix_str(f"{model} {method} {row['dtype']}")
        step = None
        try:
            if model == "lif":
                step = setup_lif(method, device, dtype, args.T, size)
            else:
                step = setup_resnet18(method, device, dtype, args.T, size, args.image_size)
            peak, how = measure(step, device)
            row.update(status="ok" if peak is not None else "unavailable", peak_bytes=peak,
                       peak_mib=None if peak is None else peak / 2**20, measure=how)
        except lif.Skip as exc:
            row.update(status="skipped", reason=str(exc))
        except torch.cuda.OutOfMemoryError as exc:
            row.update(status="error", reason=f"out of memory: {str(exc).splitlines()[0]}")
        except Exception as exc:  # noqa: BLE001 - one failing case must not end the benchmark
            row.update(status="error", reason=lif.error_reason(exc))
        finally:
            step = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        write(rows, complete=False)
        bar.update(1)
    bar.close()
    harness.finish_environment(env)
    payload = write(rows, complete=True)
    rows = payload["results"]
    if not args.no_plots:
        payload["plots"] = [str(p) for p in plot(rows, out, name, env["device_name"], args)]
    print(f"{'model':<10}{'method':<17}{'dtype':<6}{'peak MiB':>10}{'x tf':>7}")
    for r in rows:
        if r["status"] == "ok":
            ratio = r.get("ratio_to_temporal_fusion")
            print(f"{r['model']:<10}{r['method']:<17}{r['dtype']:<6}{r['peak_mib']:>10.1f}"
                  f"{(f'{ratio:.2f}' if ratio else '-'):>7}")
        else:
            print(f"{r['model']:<10}{r['method']:<17}{r['dtype']:<6}  {r['status']}: {r.get('reason', '')}")
    print(f"wrote {out / (name + '.json')}, {out / (name + '.csv')}")
    return payload


def plot(rows, out: Path, name: str, device_name: str, args) -> list[Path]:
    plt = harness.pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    models = [m for m in MODELS if any(r["model"] == m for r in ok)]
    if not models:
        return []
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        sel = [r for r in ok if r["model"] == model]
        labels = [f"{r['method']}\n{r['dtype']}" for r in sel]
        ax.bar(range(len(sel)), [r["peak_mib"] for r in sel],
               color=["C3" if r["method"] == "temporal_fusion" else "C0" for r in sel])
        ax.set_xticks(range(len(sel)), labels, fontsize=8)
        size = f"N={args.neurons:,}" if model == "lif" else f"B={args.batch}, {args.image_size}px"
        ax.set_title(f"{model}, T={args.T}, {size}", fontsize=10)
        ax.set_ylabel("peak MiB of one training step")
        ax.grid(True, axis="y", alpha=0.3)
    return [harness.save_figure(fig, out / f"{name}.png", device_name)]
