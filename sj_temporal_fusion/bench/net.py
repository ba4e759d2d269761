"""python -m sj_temporal_fusion.bench net: a whole network's training step and inference step per
backend, side by side in one run: time, peak memory, and where the time goes by layer type.

Models: SpikingJelly 0.0.0.0.14's own ``spiking_resnet18/34/50`` in multi-step mode with the
paper's neuron (LIFNode tau = 1.25, decay_input = False, v_threshold = 0.3, v_reset = 0,
Sigmoid(alpha = 4), as ``tests/_grid.py``), and ``spikformer``: the Spikformer of
``bench/spikformer.py``, clock_driven MultiStepLIFNodes as Spikformer's code builds them (tau 2,
detach_reset, the attention LIF at v_threshold 0.5), ``--dim`` / ``--depth`` / ``--heads``, its
nodes switched with ``sj_temporal_fusion.set_backend`` and reset with clock_driven's
``reset_net``. Input (T, B, C, H, W) uniform in [0, 1), 10 classes, loss cross-entropy of the
output averaged over T. Default: Spiking-ResNet18, T = 32, batch 4, 3 x 28 x 28 (MNIST's size,
its one channel repeated to the model's three as in experiments/; ``--channels`` other than 3
replaces the first convolution), fp32.

Methods (one setup each, the same initial weights, input and labels):
    torch                        SpikingJelly's torch backend
    cupy                         SpikingJelly's cupy backend (CUDA only)
    spikingjelly2                SpikingJelly 2.x's own path (it has no backends; what it selects
                                 on a GPU: see ``bench lif``); its Spiking-ResNets only (the
                                 Spikformer here is built from clock_driven nodes, which 2.x removed)
    temporal_fusion              this package's backend
    temporal_fusion+spike_bits   the same, with ``sj_temporal_fusion.optimize(net)``: spikes that
                                 a layer saves for its backward are kept as bits
    temporal_fusion+fold_bn      ``optimize(net, fold_bn=True)``: spike bits and BatchNorm folded
                                 into the neuron (the 9 bn -> sn pairs of Spiking-ResNet18; for
                                 the Spikformer the pairs it names, ``spikformer.fold_pairs``:
                                 its BatchNorms run in forward code, where nothing can find them);
                                 the batch statistics are computed in the neuron's forward, so
                                 that time counts as 'neuron', not 'bn'
Under SpikingJelly 2.x the temporal_fusion methods switch the same model with
``sj_temporal_fusion.set_backend``; torch and cupy (0.0.0.0.14's backends) are skipped there, as
spikingjelly2 is under 0.0.0.0.14. The default methods are the installed SpikingJelly's; the
first-step check and the ``*_vs_<reference>`` columns compare with its unfused path: ``torch`` under
0.0.0.0.14, ``spikingjelly2`` under 2.x.
The Spikformer's cupy row is SpikingJelly's clock_driven cupy backend, which needs tensorboard
installed (its kernel module imports it; without it the row is skipped and says so).
Modes: 'train' = reset, zero_grad, forward, loss, backward (no optimiser step, so every step
sees the same weights); 'infer' = eval mode under no_grad (BatchNorm on running statistics).
SpikingJelly 0.0.0.0.14's LIFNode runs its TorchScript loop in eval mode whatever the backend,
so 'infer' of cupy equals torch there (the row says so); ours runs its kernel in eval mode too.

Correctness before timing: each method's loss and parameter gradients at the first step are
compared with the torch backend's (max abs difference, and relative to the largest gradient);
the spike_bits method must give temporal_fusion's gradients bit for bit. That first step runs
with cuDNN's deterministic algorithms, autotuning off and PyTorch's deterministic algorithms on
(``deterministic()``): otherwise two networks' convolution weight gradients may take different
cuDNN algorithms or reduction orders and differ in rounding whatever the spikes. A method over
the bound is not timed (status check_failed); the timed steps run with the settings as they were.

Time: the methods are interleaved, one step of each per round, after ``--warmup`` untimed rounds,
so drifting load on a shared machine hits every method alike; median and quartiles over rounds.
Peak memory, above what is live when the step starts (weights, input):
    CUDA  torch.cuda.max_memory_allocated (the caching allocator's peak of live tensor bytes)
    CPU   the peak of torch's CPU allocator's live bytes from the profiler's allocation events
          (``bench.memory.peak_cpu``; not the process RSS)
Where the time goes: one profiled step per method. Each leaf module's forward runs inside a
``record_function`` range named by its type (conv, bn, neuron, other) and each backward node is
given the range of the forward op that created it (autograd sequence numbers), so an op's self
time (CPU) or self kernel time (CUDA) lands in conv, bn, neuron, spike_bits (packing and
unpacking) or other (everything else: pooling, linear layers, the Spikformer's attention
products, residual adds, the loss, Python).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import warnings
from pathlib import Path
from typing import Optional

import torch

from .. import versions
from . import harness, lif, memory, spikformer

MODELS = ("resnet18", "resnet34", "resnet50", "spikformer")
FUSED = ("temporal_fusion", "temporal_fusion+spike_bits", "temporal_fusion+fold_bn")
METHODS = ("torch", "cupy", "spikingjelly2") + FUSED
# The installed SpikingJelly's unfused path: the first-step check's reference.
REFERENCE = "torch" if versions.GENERATION == 1 else "spikingjelly2"
DEFAULT_METHODS = (("torch", "cupy") if versions.GENERATION == 1 else ("spikingjelly2",)) + FUSED
MODES = ("train", "infer")
OPTIONS = {"temporal_fusion+spike_bits": dict(spike_bits=True),  # sj_temporal_fusion.optimize(net, **)
           "temporal_fusion+fold_bn": dict(spike_bits=True, fold_bn=True)}  # both options on
CATEGORIES = ("conv", "bn", "neuron", "spike_bits", "other")
NEURON = dict(tau=1.25, decay_input=False, v_threshold=0.3, v_reset=0.0)
# Gross-error guard before timing: gradients of a backend against the torch backend's, relative
# to the largest gradient. The backends agree to ~1e-6 in fp32 on a first step (tests); a wrong
# kernel or a dropped gradient shows as O(1).
GRAD_TOLERANCE = 1e-3
# Folded BatchNorm rounds the normalisation differently, so a spike whose h lies within rounding
# of the threshold may flip; in the Spikformer such a flip changes q k^T by a whole spike and
# cascades: T = 16, batch 4, 28 x 28, fp32: 1 flipped spike of 8e5 in the last patch stage, 134
# of 2e5 by the MLP, gradients 1.5e-3 of the largest apart, while in fp64 folded and unfolded
# agree to 6e-15. Still far below the O(1) of a wrong kernel.
FOLD_GRAD_TOLERANCE = 1e-2
SPIKFORMER = dict(dim=64, depth=1, heads=4)  # --dim, --depth, --heads
SPIKFORMER_NEURON = ("clock_driven MultiStepLIFNode(tau=2.0, detach_reset=True), Sigmoid(alpha=4) surrogate, "
                     "v_threshold 1 (the attention LIF 0.5)")
COLUMNS = ["model", "method", "mode", "T", "batch", "image_size", "status", "median_ms", "p25_ms",
           "p75_ms", "min_ms", "reps", f"speedup_vs_{REFERENCE}", "speedup_vs_cupy", "peak_mib",
           f"memory_vs_{REFERENCE}", "memory_vs_cupy", f"loss_abs_diff_vs_{REFERENCE}",
           f"grad_rel_diff_vs_{REFERENCE}", "grad_bitwise_equal_to_temporal_fusion"] + [f"{c}_ms" for c in CATEGORIES] + \
          [f"{c}_share" for c in CATEGORIES] + ["memory_measure", "reason"]


class Skip(lif.Skip):
    """A method that cannot run here; the message lands in the JSON."""


# ---------------------------------------------------------------- setups

def build_model(model: str, backend: str, channels: int = 3, num_classes: int = 10,
                spikformer_size: Optional[dict] = None) -> torch.nn.Module:
    """SpikingJelly's spiking_resnet<depth> with the paper's LIF neuron, multi-step, on
    ``backend`` (under 2.x: 'temporal_fusion' or 'spikingjelly2', its own path), initial weights
    from seed 0; the first convolution takes ``channels`` inputs. ``spikformer``:
    bench/spikformer.py's model with ``spikformer_size`` (dim, depth, heads)."""
    from spikingjelly.activation_based import functional, neuron, surrogate
    from spikingjelly.activation_based.model import spiking_resnet
    import sj_temporal_fusion  # noqa: F401 - registers the backend
    lif.require_backend(backend)
    if versions.GENERATION == 2 and model == "spikformer":
        raise Skip("this Spikformer is built from clock_driven nodes, which SpikingJelly 2 removed")
    torch.manual_seed(0)
    if model == "spikformer":
        net = spikformer.Spikformer("torch", in_channels=channels, num_classes=num_classes,
                                    **(spikformer_size or SPIKFORMER))
        report = sj_temporal_fusion.set_backend(net, backend)
        if report.not_switched:
            raise Skip(f"clock_driven nodes do not take backend={backend!r}: "
                       + "; ".join(sorted(set(report.not_switched.values()))))
        return net
    net = getattr(spiking_resnet, f"spiking_{model}")(
        spiking_neuron=neuron.LIFNode, surrogate_function=surrogate.Sigmoid(alpha=lif.SG_ALPHA),
        num_classes=num_classes, **NEURON)
    if channels != 3:
        old = net.conv1
        net.conv1 = type(old)(channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                              bias=old.bias is not None)
    functional.set_step_mode(net, "m")
    if versions.GENERATION == 2:
        if backend == "temporal_fusion":
            report = sj_temporal_fusion.set_backend(net, backend)
            if report.not_switched:
                raise Skip("; ".join(sorted(set(report.not_switched.values()))))
        return net
    functional.set_backend(net, backend, neuron.LIFNode)
    if not all(m.backend == backend for m in net.modules() if isinstance(m, neuron.LIFNode)):
        raise Skip(f"LIFNode of this SpikingJelly does not take backend={backend!r}")
    return net


class Setup:
    """One method's network, input and step; ``step()`` runs one training or inference step."""

    def __init__(self, method: str, mode: str, model: str, device: torch.device, T: int, batch: int,
                 image_size: int, channels: int, spikformer_size: Optional[dict] = None):
        backend = "temporal_fusion" if method.startswith("temporal_fusion") else method
        if method == "cupy":
            lif.setup_cupy(lif.Case(method, mode, torch.float32, T, 1, device), None, None)  # Skip off CUDA
        self.method, self.mode, self.device = method, mode, device
        self.net = build_model(model, backend, channels, spikformer_size=spikformer_size).to(device)
        self.reset = spikformer.reset if model == "spikformer" else _reset_activation_based
        self.averages_time = model == "spikformer"  # its head averages over T, as Spikformer's does
        if method in OPTIONS:
            import sj_temporal_fusion
            options = dict(OPTIONS[method])
            if options.get("fold_bn") and model == "spikformer":  # BatchNorms in forward code: named
                options["fold_bn"] = spikformer.fold_pairs(self.net)
            sj_temporal_fusion.optimize(self.net, **options)
        self.net.train(mode == "train")
        g = torch.Generator().manual_seed(1)
        self.x = torch.rand(T, batch, channels, image_size, image_size, generator=g).to(device)
        self.label = torch.randint(0, 10, (batch,), generator=g).to(device)
        self.loss = None
        if method == "cupy":
            from ..compat import with_numpy_int_alias
            self.step = with_numpy_int_alias(self.step)

    def step(self):
        self.reset(self.net)
        if self.mode == "infer":
            with torch.no_grad():
                return self.net(self.x)
        self.net.zero_grad(set_to_none=True)
        out = self.net(self.x)
        out = out if self.averages_time else out.mean(0)
        self.loss = torch.nn.functional.cross_entropy(out.float(), self.label)
        self.loss.backward()
        return self.loss

    def __call__(self):
        return self.step()

    def clear(self):
        self.net.zero_grad(set_to_none=True)

    def gradients(self) -> dict:
        return {n: p.grad.detach().clone() for n, p in self.net.named_parameters() if p.grad is not None}


def _reset_activation_based(net):
    from spikingjelly.activation_based import functional
    functional.reset_net(net)


@contextlib.contextmanager
def deterministic():
    """cuDNN's deterministic algorithms without autotuning, and PyTorch's deterministic
    algorithms (a warning, silenced, where an op has none), restored on exit."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn.deterministic, cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation")
            yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def check(setups: dict, mode: str) -> dict:
    """First-step agreement of each method with REFERENCE, the unfused path (and of spike_bits with
    temporal_fusion, bit for bit); {method: {fields}}; fails the method when over tolerance. The
    steps run under ``deterministic()``, so that the bitwise comparison sees the spikes' effect
    only."""
    results, reference = {}, {}
    for method, s in setups.items():
        with deterministic():
            out = s.step()
        if mode == "train":
            reference[method] = (s.loss.detach().double(), s.gradients())
        else:
            reference[method] = (out.detach().double(), None)
    if REFERENCE not in reference:
        return {m: {} for m in setups}
    base_out, base_grads = reference[REFERENCE]
    for method, (out, grads) in reference.items():
        r = {f"loss_abs_diff_vs_{REFERENCE}": (out - base_out).abs().max().item()}
        if grads is not None:
            scale = max(g.abs().max().item() for g in base_grads.values()) or 1.0
            r[f"grad_rel_diff_vs_{REFERENCE}"] = max((grads[n].double() - base_grads[n].double()).abs().max().item()
                                              for n in base_grads) / scale
            bound = FOLD_GRAD_TOLERANCE if OPTIONS.get(method, {}).get("fold_bn") else GRAD_TOLERANCE
            r["check_ok"] = r[f"grad_rel_diff_vs_{REFERENCE}"] <= bound
        else:
            # Inference: outputs are spike counts averaged into a linear layer; one flipped spike
            # near the threshold moves them, so only gross errors fail.
            r["check_ok"] = r[f"loss_abs_diff_vs_{REFERENCE}"] <= 0.1 * max(1.0, base_out.abs().max().item())
        results[method] = r
    if "temporal_fusion+spike_bits" in reference and "temporal_fusion" in reference:
        (a, ga), (b, gb) = reference["temporal_fusion+spike_bits"], reference["temporal_fusion"]
        equal = torch.equal(a, b) and (ga is None or all(torch.equal(ga[n], gb[n]) for n in gb))
        results["temporal_fusion+spike_bits"]["grad_bitwise_equal_to_temporal_fusion"] = equal
        results["temporal_fusion+spike_bits"]["check_ok"] &= equal
    return results


# ---------------------------------------------------------------- where the time goes

def _marked_modules(net: torch.nn.Module):
    """(module, category): conv, bn and neuron modules (not their children: a neuron holds its
    surrogate as a submodule), and every other leaf as 'other'."""
    from spikingjelly.activation_based import neuron
    cd_neuron = versions.clock_driven("neuron")  # a stand-in matching nothing under 2.x
    kinds = ((torch.nn.modules.conv._ConvNd, "conv"), (torch.nn.modules.batchnorm._BatchNorm, "bn"),
             ((neuron.BaseNode, cd_neuron.BaseNode), "neuron"))
    stack = [net]
    while stack:
        module = stack.pop()
        kind = next((name for cls, name in kinds if isinstance(module, cls)), None)
        children = list(module.children())
        if kind is not None:
            yield module, kind
        elif not children:
            yield module, "other"
        else:
            stack.extend(children)


MARK = "sjtf.net::"


def breakdown(setup: Setup) -> dict:
    """Milliseconds of one profiled step per category (CATEGORIES), from the profiler's events."""
    from torch.profiler import ProfilerActivity, profile, record_function
    handles, open_ranges = [], []

    def enter(name):
        def pre(module, args):
            rf = record_function(MARK + name)
            rf.__enter__()
            open_ranges.append(rf)
        return pre

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    for module, name in _marked_modules(setup.net):
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    try:
        setup.step()  # unprofiled: the marks' first use
        harness.synchronize(setup.device)
        with profile(activities=activities) as prof:
            setup.step()
            harness.synchronize(setup.device)
    finally:
        for h in handles:
            h.remove()
    return attribute(prof.events(), cuda=setup.device.type == "cuda")


def _marker(event) -> Optional[str]:
    name = event.name
    if name.startswith(MARK):
        return name[len(MARK):]
    if name.startswith("sj_temporal_fusion::spike_bits"):
        return "spike_bits"
    return None


def attribute(events, cuda: bool = False) -> dict:
    """Self time of every event into its innermost category: a module mark, a spike-bits range,
    or for backward ops the category of the forward op with the same sequence number."""
    backward_prefix = "autograd::engine::evaluate_function:"
    forward_category: dict[int, str] = {}
    ancestry = {}

    def resolve(event):
        """(category or None, inside backward?) from the innermost marked ancestor."""
        key = id(event)
        if key in ancestry:
            return ancestry[key]
        e, result = event, (None, False)
        while e is not None:
            mark = _marker(e)
            if mark is not None:
                result = (mark, False)
                break
            if e.name.startswith(backward_prefix):
                result = ("@" + str(e.sequence_nr), True)
                break
            e = e.cpu_parent
        ancestry[key] = result
        return result

    for e in events:
        cat, backward = resolve(e)
        if not backward and e.sequence_nr >= 0 and cat is not None:
            forward_category.setdefault(e.sequence_nr, cat)
    totals = {c: 0.0 for c in CATEGORIES}
    for e in events:
        cat, backward = resolve(e)
        if backward:
            cat = forward_category.get(int(cat[1:]), "other")
        self_us = e.self_device_time_total if cuda else e.self_cpu_time_total
        totals[cat if cat in totals else "other"] += self_us / 1e3
    return totals


# ---------------------------------------------------------------- the run

def run_case(model: str, mode: str, methods: list[str], device: torch.device, args, bar=None) -> list[dict]:
    rows, setups = [], {}
    for method in methods:
        row = {"model": model, "method": method, "mode": mode, "T": args.T, "batch": args.batch,
               "image_size": args.image_size}
        try:
            setups[method] = Setup(method, mode, model, device, args.T, args.batch, args.image_size,
                                   args.channels, spikformer_size(args))
            row["status"] = "pending"
        except lif.Skip as exc:
            row.update(status="skipped", reason=str(exc))
        rows.append(row)
    by_method = {r["method"]: r for r in rows}
    for method, r in check(setups, mode).items():
        ok = r.pop("check_ok", True)
        by_method[method].update(r)
        if not ok:
            by_method[method].update(status="check_failed", reason="first-step loss or gradients "
                                     f"differ from {REFERENCE}'s beyond the gross-error bound")
            setups.pop(method)
    if mode == "infer" and "cupy" in setups:
        by_method["cupy"]["reason"] = ("SpikingJelly 0.0.0.0.14 runs the TorchScript loop in eval "
                                       "mode whatever the backend: this row times its torch backend")
    # Interleaved rounds: one step of every method per round.
    for _ in range(args.warmup):
        for s in setups.values():
            s.step()
    timings = {m: harness.Timing() for m in setups}
    spent = 0.0
    for i in range(args.reps):
        for method, s in setups.items():
            t = harness.time_fn(s.step, device, warmup=0, reps=1, min_reps=1)
            timings[method].samples_ms += t.samples_ms
            timings[method].wall_samples_ms += t.wall_samples_ms
            spent += t.samples_ms[0] / 1e3
        if bar is not None:
            bar.set_postfix_str(f"{model} {mode} round {i + 1}")
        if i + 1 >= args.min_reps and spent > args.max_seconds:
            break
    for method, s in setups.items():
        row = by_method[method]
        row.update(status="ok", **timings[method].summary())
        peak, how = memory.measure(s, device)
        row.update(peak_bytes=peak, peak_mib=None if peak is None else peak / 2**20, memory_measure=how)
        if not args.no_profile:
            parts = breakdown(s)
            total = sum(parts.values()) or 1.0
            row.update({f"{c}_ms": v for c, v in parts.items()})
            row.update({f"{c}_share": v / total for c, v in parts.items()})
    setups.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for base in (REFERENCE, "cupy"):
        b = by_method.get(base, {})
        for r in rows:
            if r["status"] == "ok" and b.get("status") == "ok":
                r[f"speedup_vs_{base}"] = b["median_ms"] / r["median_ms"]
                if r.get("peak_bytes") and b.get("peak_bytes"):
                    r[f"memory_vs_{base}"] = r["peak_bytes"] / b["peak_bytes"]
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="resnet18", help=",".join(MODELS) + " (default resnet18)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"{','.join(METHODS)} (default: the installed SpikingJelly's, {','.join(DEFAULT_METHODS)})")
    p.add_argument("--modes", default=",".join(MODES), help="train,infer")
    p.add_argument("--T", type=int, default=32, help="time steps (default 32, Table 1)")
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4; Table 1 on GPU: 100)")
    p.add_argument("--image-size", type=int, default=28, help="input H = W (default 28, MNIST)")
    p.add_argument("--channels", type=int, default=3,
                   help="input channels (default 3: SpikingJelly's model unchanged)")
    p.add_argument("--reps", type=int, default=10, help="timed rounds at most (default 10)")
    p.add_argument("--min-reps", type=int, default=3, help="timed rounds at least (default 3)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed rounds first (default 3: TorchScript specialises over the first calls)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop adding rounds once this much time was measured (default 60)")
    p.add_argument("--no-profile", action="store_true", help="skip the by-layer-type profile")
    p.add_argument("--dim", type=int, default=SPIKFORMER["dim"],
                   help=f"spikformer: embedding dimension (default {SPIKFORMER['dim']})")
    p.add_argument("--depth", type=int, default=SPIKFORMER["depth"],
                   help=f"spikformer: encoder blocks (default {SPIKFORMER['depth']})")
    p.add_argument("--heads", type=int, default=SPIKFORMER["heads"],
                   help=f"spikformer: attention heads (default {SPIKFORMER['heads']})")


def spikformer_size(args) -> dict:
    return {k: getattr(args, k, SPIKFORMER[k]) for k in SPIKFORMER}


def main(args) -> dict:
    device = harness.resolve_device(args.device)
    models = harness.parse_names(args.models, MODELS, "model")
    methods = harness.parse_names(args.methods, METHODS, "method")
    modes = harness.parse_names(args.modes, MODES, "mode")
    env = harness.environment(device)
    env["cpu_allocator"] = getattr(args, "cpu_allocator_setting", None)
    rows = []
    cases = [(m, mode) for m in models for mode in modes]
    bar = harness.progress(len(cases), "net", enabled=not args.quiet)
    for model, mode in cases:
        rows += run_case(model, mode, methods, device, args, bar)
        bar.update(1)
    bar.close()
    payload = {"benchmark": "net", "environment": harness.finish_environment(env),
               "config": {"models": models, "methods": methods, "modes": modes, "T": args.T,
                          "batch": args.batch, "image_size": args.image_size, "channels": args.channels,
                          **({"spikformer": {**spikformer_size(args), "neuron": SPIKFORMER_NEURON}}
                             if "spikformer" in models else {}),
                          "neuron": {**NEURON, "surrogate": f"Sigmoid(alpha={lif.SG_ALPHA})"},
                          "reps": args.reps, "warmup": args.warmup, "profile": not args.no_profile},
               "results": rows}
    name = args.name or f"net-{device.type}"
    out = Path(args.out)
    harness.write_json(out / f"{name}.json", payload)
    harness.write_csv(out / f"{name}.csv", rows, COLUMNS)
    if not args.no_plots:
        payload["plots"] = [str(p) for p in plot(rows, out, name, env["device_name"], args)]
    print(table(rows))
    print(f"wrote {out / (name + '.json')}, {out / (name + '.csv')}")
    return payload


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(rows: list[dict]) -> str:
    short = {"torch": "torch", "spikingjelly2": "sj2"}[REFERENCE]
    lines = [f"{'model':<11}{'mode':<6}{'method':<28}{'ms':>10}{'x ' + short:>8}{'peak MiB':>10}"
             f"{'mem/' + short:>10}  conv/bn/neuron/bits/other %"]
    for r in rows:
        head = f"{r['model']:<11}{r['mode']:<6}{r['method']:<28}"
        if r["status"] != "ok":
            lines.append(head + f"{r['status']}: {r.get('reason', '')}")
            continue
        shares = "/".join(_fmt(100 * r[f'{c}_share'], '.0f') if f"{c}_share" in r else "-" for c in CATEGORIES)
        lines.append(head + f"{_fmt(r['median_ms'], '10.1f')}{_fmt(r.get(f'speedup_vs_{REFERENCE}'), '8.2f')}"
                     f"{_fmt(r.get('peak_mib'), '10.1f')}{_fmt(r.get(f'memory_vs_{REFERENCE}'), '10.2f')}  {shares}")
    return "\n".join(lines)


def plot(rows, out: Path, name: str, device_name: str, args) -> list[Path]:
    """Time, peak memory and the by-layer-type split of each (model, mode), one bar per method."""
    plt = harness.pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    groups = [(m, mode) for m in MODELS for mode in MODES if any(r["model"] == m and r["mode"] == mode for r in ok)]
    if not groups:
        return []
    fig, axes = plt.subplots(len(groups), 3, figsize=(13, 3.2 * len(groups)), squeeze=False)
    colors = {"conv": "C0", "bn": "C1", "neuron": "C3", "spike_bits": "C4", "other": "0.6"}
    for row_axes, (model, mode) in zip(axes, groups):
        sel = [r for r in ok if r["model"] == model and r["mode"] == mode]
        labels = [r["method"].replace("temporal_fusion", "tf").replace("+", "\n+") for r in sel]
        xs = range(len(sel))
        row_axes[0].bar(xs, [r["median_ms"] for r in sel], yerr=[[r["median_ms"] - r["p25_ms"] for r in sel],
                        [r["p75_ms"] - r["median_ms"] for r in sel]], color="C2")
        row_axes[0].set_ylabel("ms per step (median)")
        row_axes[1].bar(xs, [r.get("peak_mib") or 0 for r in sel], color="C5")
        row_axes[1].set_ylabel("peak MiB")
        bottom = [0.0] * len(sel)
        for c in CATEGORIES:
            vals = [r.get(f"{c}_ms", 0.0) for r in sel]
            row_axes[2].bar(xs, vals, bottom=bottom, color=colors[c], label=c)
            bottom = [b + v for b, v in zip(bottom, vals)]
        row_axes[2].set_ylabel("profiled ms by layer type")
        for ax in row_axes:
            ax.set_xticks(list(xs), labels, fontsize=7)
            ax.grid(True, axis="y", alpha=0.3)
        row_axes[0].set_title(f"{model} {mode}, T={args.T}, B={args.batch}, {args.image_size}px", fontsize=9)
    axes[0][2].legend(fontsize=7)
    fig.suptitle(device_name, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = out / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
