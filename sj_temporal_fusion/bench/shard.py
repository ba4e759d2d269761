"""Time sharding: how long the forward's fix-up runs (LIF, PLIF, IF; hard and soft reset) on
realistic inputs, what the sharding kernels cost on this device, and the modelled Fig. 4 / Fig. 6.

For each neuron configuration and input family, a layer of N neurons runs ``--warmup-steps``
steps to a true state; the next ``--horizon`` steps are then run speculatively from v_reset (as a
rank does) and fixed up from the true state by csrc/temporal.cu's neuron_fixup. Reported per neuron: the
fix-up length (steps re-run until the pre-spike h matched bitwise), its mean and quantiles, the
mean over warps of 32 neurons of their longest fix-up, the maximum, and the share of neurons that
never matched within the horizon. The arithmetic is bitwise the same on CPU and GPU, so these
lengths hold for both; only the timings are device-specific.

Inputs: 'gaussian' (i.i.d. N(0, 1) currents scaled by v_threshold: what batch-normalised conv
outputs give a neuron), 'resnet' (the input currents of layer1.0.sn1 and layer2.0.sn1 of a
randomly initialised Spiking-ResNet18 in training mode, static smooth random 32x32 images
repeated over T: direct encoding).

Python API for the CLI: ``add_arguments(parser)``; ``main(args) -> dict`` (args also carries the
CLI's --device --out --name --no-plots --quiet); ``run(...)`` does the measuring.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import harness
from . import shard_model as model

CONFIGS = {
    # name: (node class name, kwargs)
    "lif-tau2": ("LIFNode", dict(tau=2.0)),                               # SpikingJelly's default LIF
    "lif-tau1.25": ("LIFNode", dict(tau=1.25, decay_input=False, v_threshold=0.3)),
    "lif-tau2-soft": ("LIFNode", dict(tau=2.0, v_reset=None)),
    "lif-tau8": ("LIFNode", dict(tau=8.0)),
    "plif-tau2": ("ParametricLIFNode", dict(init_tau=2.0)),
    "if-hard": ("IFNode", dict()),
    "if-soft": ("IFNode", dict(v_reset=None)),
}
INPUTS = ("gaussian", "resnet")
COLUMNS = ["config", "input", "dtype", "N", "horizon", "firing_rate", "mean", "p50", "p90", "p99", "p999",
           "warp_max_mean", "max", "unmatched_fraction"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"neuron configurations ({', '.join(CONFIGS)})")
    p.add_argument("--inputs", default=",".join(INPUTS), help="input families: gaussian, resnet")
    p.add_argument("--dtypes", default="fp32,fp16", help="fp32, fp16, bf16, fp64")
    p.add_argument("--neurons", type=int, default=1 << 20, help="N for the gaussian input (default 2^20)")
    p.add_argument("--resnet-batch", type=int, default=16, help="images for the resnet input (N = 4096 per "
                   "image at layer1, 2048 at layer2)")
    p.add_argument("--warmup-steps", type=int, default=64, help="steps before the slice boundary")
    p.add_argument("--horizon", type=int, default=256, help="steps after it (the longest fix-up measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=20, help="timed repetitions of each kernel timing, each after a "
                   "cache flush (default 20)")


def _node(config: str):
    from spikingjelly.activation_based import neuron
    cls_name, kwargs = CONFIGS[config]
    node = getattr(neuron, cls_name)(step_mode="m", **kwargs)
    return node


def gaussian_currents(T: int, N: int, v_threshold: float, seed: int, device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(T, N, generator=g) * v_threshold).to(device)


def resnet_currents(T: int, batch: int, seed: int, device) -> dict:
    """{layer name: (T, N) input currents} of two neuron layers of a random Spiking-ResNet18."""
    from spikingjelly.activation_based import functional, neuron
    from spikingjelly.activation_based.model import spiking_resnet
    torch.manual_seed(seed)
    net = spiking_resnet.spiking_resnet18(spiking_neuron=neuron.LIFNode, num_classes=10).to(device)
    functional.set_step_mode(net, "m")
    g = torch.Generator(device="cpu").manual_seed(seed)
    img = torch.rand(batch, 3, 40, 40, generator=g)
    img = torch.nn.functional.avg_pool2d(img, 9, stride=1)[:, :, :32, :32]  # smooth, 32x32
    img = ((img - img.mean()) / img.std()).to(device)
    wanted = ("layer1.0.sn1", "layer2.0.sn1")
    captured = {}

    class Stop(Exception):
        pass

    def hook(name):
        def fn(module, inputs):
            captured[name] = inputs[0].detach().reshape(inputs[0].shape[0], -1).float().contiguous()
            if len(captured) == len(wanted):
                raise Stop
        return fn

    modules = dict(net.named_modules())
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in wanted]
    try:
        with torch.no_grad():
            net(img.unsqueeze(0).repeat(T, 1, 1, 1, 1))
    except Stop:
        pass
    for h in handles:
        h.remove()
    return captured


def fixup_lengths(x: torch.Tensor, node, t0: int) -> tuple[torch.Tensor, float]:
    """Fix-up length per neuron at a boundary after t0 steps of x (T, N), and the firing rate."""
    from ..distributed import kernels
    from ..ops import state_dtype
    from ..frontends.common import node_options
    options = node_options(node)
    spec = kernels.NeuronSpec.from_options(**options)
    with torch.no_grad():
        params = kernels.neuron_parameters(options, x)[0]
    acc = state_dtype(x.dtype)
    N = x.shape[1]
    v0 = torch.full((N,), spec.v_reset, dtype=acc, device=x.device)
    x1, x2 = x[:t0].contiguous(), x[t0:].contiguous()
    _, v_true, _, _ = kernels.shard_forward(x1, v0, spec, params, False, False)
    guess = torch.full_like(v0, spec.v_reset)  # what a rank without the true state starts from
    spike, v_last, _, ck = kernels.shard_forward(x2, guess, spec, params, False, True)
    L = kernels.shard_fixup(x2, v_true, ck, spike, None, v_last, spec, params)
    return L, spike.float().mean().item()


def stats(L: torch.Tensor, horizon: int) -> dict:
    Lf = L.double()
    q = torch.quantile(Lf.cpu()[: 1 << 24], torch.tensor([0.5, 0.9, 0.99, 0.999], dtype=torch.float64))
    n32 = (L.numel() // 32) * 32
    warp_max = Lf[:n32].reshape(-1, 32).amax(1).mean().item() if n32 else float("nan")
    return dict(mean=Lf.mean().item(), p50=q[0].item(), p90=q[1].item(), p99=q[2].item(), p999=q[3].item(),
                warp_max_mean=warp_max, max=int(L.max().item()),
                unmatched_fraction=(L == horizon).double().mean().item())


def kernel_timings(device: torch.device, N: int, fix_x: torch.Tensor, node, t0: int, reps: int = 20) -> dict:
    """The model's components on this device (fp32): one slice's speculative forward, its fix-up
    at the measured lengths, the backward's light and final passes, and a state hop's copy; ``reps``
    timed repetitions of each."""
    from ..distributed import kernels
    from ..frontends.common import node_options
    options = node_options(node)
    spec = kernels.NeuronSpec.from_options(**options)
    out = {}
    flush = harness.CacheFlusher(device)
    with torch.no_grad():
        params = kernels.neuron_parameters(options, fix_x)[0]
    for T in (16, 128):
        x = torch.randn(T, N, device=device)
        v = torch.zeros(N, device=device)
        t = harness.time_fn(lambda: kernels.shard_forward(x, v, spec, params, False, True), device, flush=flush,
                            reps=reps)
        out[f"slice_forward_T{T}"] = dict(**t.summary(), gb_per_s=N * T * (8 + 4 / 16) / (t.median_ms / 1e3) / 1e9)
        _, _, _, ck = kernels.shard_forward(x, v, spec, params, False, True)
        gs = torch.randn(T, N, device=device)
        t = harness.time_fn(lambda: kernels.shard_backward(gs, None, None, None, x, ck, spec, params, False,
                                                           True), device, flush=flush, reps=reps)
        out[f"backward_light_T{T}"] = dict(**t.summary(), gb_per_s=N * T * 8 / (t.median_ms / 1e3) / 1e9)
        c = torch.randn(N, device=device)
        t = harness.time_fn(lambda: kernels.shard_backward(gs, None, None, c, x, ck, spec, params, True,
                                                           False), device, flush=flush, reps=reps)
        out[f"backward_final_T{T}"] = dict(**t.summary(), gb_per_s=N * T * 12 / (t.median_ms / 1e3) / 1e9)
    # the fix-up at the lengths the measured inputs give (re-running it from fresh copies)
    x1, x2 = fix_x[:t0].contiguous(), fix_x[t0:].contiguous()
    v0 = torch.full((fix_x.shape[1],), spec.v_reset, device=device)
    _, v_true, _, _ = kernels.shard_forward(x1, v0, spec, params, False, False)
    spike, v_last, _, ck = kernels.shard_forward(x2, torch.full_like(v0, spec.v_reset), spec, params, False, True)

    def fix():
        kernels.shard_fixup(x2, v_true, ck.clone(), spike, None, v_last.clone(), spec, params)
    t = harness.time_fn(fix, device, flush=flush, reps=reps)
    clone = harness.time_fn(lambda: (ck.clone(), v_last.clone()), device, flush=flush, reps=reps)
    out["fixup"] = dict(**t.summary(), clone_overhead_median_ms=clone.median_ms)
    return out


def run(device: torch.device, configs, inputs, dtypes, N: int, resnet_batch: int, t0: int, horizon: int,
        seed: int, quiet: bool = False, reps: int = 20) -> dict:
    rows = []
    T = t0 + horizon
    families = {}
    if "gaussian" in inputs:
        families["gaussian"] = None  # drawn per configuration: scaled by its threshold
    if "resnet" in inputs:
        # The network sees fewer steps on CPU-class budgets: T = t0 + horizon images per sample.
        for name, x in resnet_currents(T, resnet_batch, seed, device).items():
            families[f"resnet:{name}"] = x
    bar = harness.progress(len(configs) * len(families) * len(dtypes), "shard", enabled=not quiet)
    for config in configs:
        for family, currents in families.items():
            for dtype in dtypes:
                node = _node(config)
                x = gaussian_currents(T, N, node.v_threshold, seed, device) if currents is None else currents
                L, rate = fixup_lengths(x.to(dtype), node, t0)
                rows.append(dict(config=config, input=family, dtype=harness.DTYPE_NAMES[dtype], N=x.shape[1],
                                 horizon=horizon, firing_rate=rate, **stats(L, horizon)))
                bar.update()
    bar.close()
    node = _node("lif-tau2")
    timing = kernel_timings(device, N, gaussian_currents(T, N, 1.0, seed, device), node, t0, reps)
    return dict(rows=rows, timing=timing)


def main(args) -> dict:
    device = harness.resolve_device(args.device)
    configs = harness.parse_names(args.configs, CONFIGS, "configuration")
    inputs = harness.parse_names(args.inputs, INPUTS, "input")
    dtypes = [harness.DTYPES[d] for d in harness.parse_names(args.dtypes, harness.DTYPES, "dtype")]
    env = harness.environment(device)
    result = run(device, configs, inputs, dtypes, args.neurons, args.resnet_batch, args.warmup_steps,
                 args.horizon, args.seed, args.quiet, args.reps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"shard-{device.type}"
    hw = model.Hardware()
    payload = {"benchmark": "shard", "environment": harness.finish_environment(env),
               "params": dict(configs=configs, inputs=inputs, dtypes=args.dtypes, neurons=args.neurons,
                              resnet_batch=args.resnet_batch, warmup_steps=args.warmup_steps,
                              horizon=args.horizon, seed=args.seed, reps=args.reps),
               "measured": {"fixup": result["rows"], "kernel_timings_this_device": result["timing"]},
               "modelled": {"hardware_stated": model.hardware_dict(hw), "fig6": {}}}
    if not args.no_plots:
        model.fig4(out / f"{name}-fig4-eq5.png")
        # Fig. 6 from the gaussian-input fix-up lengths of SpikingJelly's default LIF and the
        # issue's LIF(tau=1.25, decay_input=False, v_threshold=0.3)
        for config in ("lif-tau2", "lif-tau1.25"):
            base = next((r for r in result["rows"] if r["config"] == config and r["input"] == "gaussian"
                         and r["dtype"] == "fp32"), None)
            if base is None:
                continue
            fix = model.Fixup(base["mean"], base["warp_max_mean"], base["max"])
            source = f"{config}, gaussian input, fp32, N={base['N']:,}"
            payload["modelled"]["fig6"][config] = dict(fixup_source=source, points=model.fig6(
                out / f"{name}-fig6-modelled-{config}.png", fix, hw, source=source))
    harness.write_json(out / f"{name}.json", payload)
    harness.write_csv(out / f"{name}.csv", result["rows"], COLUMNS)
    return payload
