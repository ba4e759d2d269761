"""README demo: what the temporal_fusion backend changes, measured in one run on this machine.

    python experiments/demo.py            # CUDA when available, else CPU; runs/demo/demo.md

Three parts, each comparing the temporal_fusion backend with SpikingJelly's torch backend:
  1. First-step agreement: digits batches through Spiking-ResNet18 with the same initial
     weights on both backends: the loss and every gradient at step 1 (max abs difference), then
     the weights' difference after each of 3 Adam steps. Step 1 is where the backends can be
     compared exactly; Adam divides each gradient element by its own magnitude, so rounding-level
     differences become lr-sized weight differences and the training trajectories part.
  2. A training step at T = 32 (the paper's T, where the neurons are a large share of the work):
     time (median of interleaved repetitions) and peak tensor memory, from ``bench net``, with
     and without ``sj_temporal_fusion.optimize`` (spikes saved as bits).
  3. Training: Spiking-ResNet18 on scikit-learn's bundled digits (offline) at T = 4 for each
     backend and each of 3 seeds (configs/demo/digits_resnet18.yaml, through table1.py): best
     test accuracy as mean, standard deviation and every seed. With this little training, seeds
     differ by several points; the two backends are alike when their means lie within that spread.

Options: ``--device cpu``, ``--skip-train`` (parts 1 and 2 only), ``--step-T``, ``--step-batch``;
other arguments go to table1.py (e.g. ``--epochs 2``, ``--repeats 5``). Sized for about 4
minutes on an idle 2-core CPU (estimated from per-step costs, not yet timed on an idle one: on
the shared development VM at load average 7-12 it took 45 minutes); timings taken while other
work runs are marked with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

if __package__ in (None, ""):  # run as a file: import as a package
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

import torch

from experiments import config as configs
from experiments import data, model as models, runtime as rt, table1
from experiments.config import CONFIG_DIR

CONFIG = CONFIG_DIR / "demo" / "digits_resnet18.yaml"
BACKENDS = ("temporal_fusion", "torch")
OUT = Path("runs/demo")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--skip-train", action="store_true", help="first step and T=32 step only")
    p.add_argument("--step-T", type=int, default=32, help="T of the timed training step (default 32)")
    p.add_argument("--step-batch", type=int, default=4, help="batch of the timed step (default 4)")
    p.add_argument("--step-reps", type=int, default=3, help="timed rounds of that step (default 3)")
    return p


# ---------------------------------------------------------------- 1. first step

def first_steps(config: dict, device: torch.device, steps: int = 3) -> dict:
    """Both backends from the same weights on the same digits batches: loss and gradients at
    step 1, then how far the weights drift apart over ``steps`` Adam steps."""
    spec = data.spec_of(config)
    train_set, _ = data.load(config)
    loader = torch.utils.data.DataLoader(train_set, batch_size=config["batch_size"])
    encoder = data.Encoder(spec, config["T"], config["static_encoding"], device)
    batches = []
    for i, (x, y) in zip(range(steps), loader):
        encoder.reseed(i)
        batches.append((encoder(x.to(device), x.shape[0]), y.to(device)))
    nets, optimizers = {}, {}
    for backend in BACKENDS:
        torch.manual_seed(config["seed"])
        nets[backend] = models.build({**config, "backend": backend}, spec.classes).to(device).train()
        optimizers[backend] = torch.optim.Adam(nets[backend].parameters(), lr=config["lr"])
    a, b = BACKENDS
    history, first = [], None
    for step, (x_seq, y) in enumerate(batches, 1):
        losses, grads = {}, {}
        for backend in BACKENDS:
            from spikingjelly.activation_based import functional
            functional.reset_net(nets[backend])
            optimizers[backend].zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(nets[backend](x_seq).mean(0), y)
            loss.backward()
            losses[backend] = loss.item()
            grads[backend] = {n: p.grad.detach().double() for n, p in nets[backend].named_parameters()}
            optimizers[backend].step()
        diffs = {n: (grads[a][n] - grads[b][n]).abs().max().item() for n in grads[a]}
        worst = max(diffs, key=diffs.get)
        weights = max((pa.detach() - pb.detach()).abs().max().item() for pa, pb in
                      zip(nets[a].parameters(), nets[b].parameters()))
        history.append({"step": step, "loss": losses, "loss_abs_diff": abs(losses[a] - losses[b]),
                        "grad_max_abs_diff": diffs[worst], "weight_max_abs_diff_after": weights})
        if first is None:
            # Adam's first update is lr * g / (|g| + eps) ~ lr * sign(g): only a gradient sign
            # that differs between the backends gives a different first update.
            first = {"grad_max_abs_diff_at": worst,
                     "grad_max_abs": max(g.abs().max().item() for g in grads[b].values()),
                     "grad_sign_differences": sum(int((torch.sign(grads[a][n]) != torch.sign(grads[b][n])).sum())
                                                  for n in grads[a]),
                     "grad_elements": sum(g.numel() for g in grads[a].values())}
    return {"T": config["T"], "batch": config["batch_size"], "lr": config["lr"], **history[0], **first,
            "steps": history}


# ---------------------------------------------------------------- 2. a step at T = 32

def step_at_T(device: torch.device, T: int, batch: int, reps: int) -> dict:
    from sj_temporal_fusion.bench import harness, net
    methods = ["torch"] + (["cupy"] if device.type == "cuda" else []) + \
              ["temporal_fusion", "temporal_fusion+spike_bits"]
    args = SimpleNamespace(T=T, batch=batch, image_size=28, channels=3, reps=reps, min_reps=reps,
                           warmup=1, max_seconds=120.0, no_profile=True)
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    rows = net.run_case("resnet18", "train", methods, device, args)
    return {"T": T, "batch": batch, "image": "3x28x28", "reps": reps, "loadavg_start": load,
            "loadavg_end": list(os.getloadavg()) if load is not None else None,
            "device": harness.device_name(device), "rows": rows}


# ---------------------------------------------------------------- 3. training over seeds

def train(extra: list[str], out: Path, device: str) -> dict:
    argv = ["--configs", str(CONFIG), "--backends", *BACKENDS, "--out", str(out), "--no-progress"]
    if device != "auto" and "--device" not in extra:
        argv += ["--device", device]
    code = table1.main(argv + extra)
    runs = {}
    for backend in BACKENDS:
        path = out / configs.load(CONFIG)["name"] / backend / "metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            acc = [r["best_accuracy"] for r in m["repeats"]]
            runs[backend] = {"seeds": [r["seed"] for r in m["repeats"]], "accuracy": acc,
                             "mean": statistics.mean(acc),
                             "std": statistics.stdev(acc) if len(acc) > 1 else None,
                             "train_seconds_per_epoch": m["summary"]["train_seconds"],
                             "epochs": m["config"]["epochs"], "T": m["config"]["T"]}
    return {"exit_code": code, "runs": runs}


# ---------------------------------------------------------------- report

def _load_note(load: Optional[list], cores: int) -> str:
    if not load:
        return ""
    busy = max(load[0], 0.0) > 0.5
    return (f" Load average {load[0]:.1f} on {cores} cores at the start"
            + (": **measured under load** (other work shared the cores), compare within this run only."
               if busy else "."))


def markdown(result: dict) -> str:
    lines = ["# Demo: temporal_fusion vs SpikingJelly's torch backend", ""]
    f = result["first_step"]
    lines += [f"## 1. First steps (same initial weights, same input spikes; T={f['T']}, batch {f['batch']})", "",
              f"- step 1 loss: temporal_fusion {f['loss']['temporal_fusion']:.7f}, torch "
              f"{f['loss']['torch']:.7f}, |diff| {f['loss_abs_diff']:.2e}",
              f"- step 1 gradients: max |diff| {f['grad_max_abs_diff']:.2e} (at `{f['grad_max_abs_diff_at']}`), "
              f"largest gradient {f['grad_max_abs']:.2e}; {f['grad_sign_differences']} of "
              f"{f['grad_elements']:,} elements differ in sign",
              f"- Adam (lr {f['lr']:g}) normalises every gradient element by its own magnitude, so "
              f"rounding-level differences in tiny gradients become weight differences of order lr:", "",
              "| step | loss |diff| | gradient max |diff| | weights max |diff| after the step |",
              "|---|---|---|---|"]
    lines += [f"| {h['step']} | {h['loss_abs_diff']:.2e} | {h['grad_max_abs_diff']:.2e} | "
              f"{h['weight_max_abs_diff_after']:.2e} |" for h in f["steps"]]
    lines += ["", "From there the two runs follow different trajectories: compare accuracies over "
              "seeds (part 3), not one run each.", ""]
    s = result.get("step")
    if s:
        lines += [f"## 2. One training step at T={s['T']} (Spiking-ResNet18, batch {s['batch']}, "
                  f"{s['image']}, {s['device']})", "",
                  "Median of " + str(s["reps"]) + " interleaved repetitions; peak memory: "
                  + (s["rows"][0].get("memory_measure") or "") + "."
                  + _load_note(s["loadavg_start"], os.cpu_count() or 1), "",
                  "| method | ms per step | x torch | peak MiB | memory vs torch | gradients vs torch (rel.) |",
                  "|---|---|---|---|---|---|"]
        for r in s["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {r['method']} | {r['status']}: {r.get('reason', '')} | | | | |")
                continue
            lines.append(f"| {r['method']} | {r['median_ms']:.0f} | {r.get('speedup_vs_torch', 0):.2f}x | "
                         f"{r['peak_mib']:.0f} | {r.get('memory_vs_torch', 0):.2f}x | "
                         f"{r.get('grad_rel_diff_vs_torch', 0):.1e} |")
        lines.append("")
    t = result.get("train")
    if t and t["runs"]:
        any_run = next(iter(t["runs"].values()))
        lines += [f"## 3. Training on digits (T={any_run['T']}, {any_run['epochs']} epoch(s), "
                  f"{len(any_run['seeds'])} seeds)", "",
                  "| backend | best test accuracy %: mean ± std | every seed | train s/epoch |",
                  "|---|---|---|---|"]
        for backend, r in t["runs"].items():
            std = f" ± {r['std']:.1f}" if r["std"] is not None else ""
            lines.append(f"| {backend} | {r['mean']:.1f}{std} | "
                         f"{', '.join(f'{a:.1f}' for a in r['accuracy'])} | {r['train_seconds_per_epoch']:.1f} |")
        if len(t["runs"]) == 2:
            a, b = (t["runs"][k] for k in BACKENDS)
            spread = max(x["std"] or 0.0 for x in (a, b))
            verdict = ("within" if abs(a["mean"] - b["mean"]) <= 2 * spread else "outside")
            lines += ["", f"Difference of the means {a['mean'] - b['mean']:+.1f} points, {verdict} two "
                      f"seed-to-seed standard deviations ({2 * spread:.1f}). At T={any_run['T']} the "
                      f"neurons are a small share of a step, so the epoch times say little about the "
                      f"backends: part 2 measures the step where they matter."]
        lines.append("")
    lines.append(f"Total {result['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    args, extra = parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    import sj_temporal_fusion  # noqa: F401 - registers the backend
    device = rt.resolve_device(args.device)
    config = configs.load(CONFIG)
    result = {"device": str(device)}
    print("[1/3] first steps: loss, gradients and weights of both backends", flush=True)
    result["first_step"] = first_steps(config, device)
    print(f"[2/3] one training step at T={args.step_T}, batch {args.step_batch}", flush=True)
    result["step"] = step_at_T(device, args.step_T, args.step_batch, args.step_reps)
    code = 0
    if not args.skip_train:
        print("[3/3] training on digits, every backend x seed (table1.py)", flush=True)
        result["train"] = train(extra, args.out, args.device)
        code = result["train"]["exit_code"]
    result["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    text = markdown(result)
    (args.out / "demo.md").write_text(text)
    print("\n" + text)
    print(f"wrote {args.out / 'demo.md'}, {args.out / 'demo.json'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
