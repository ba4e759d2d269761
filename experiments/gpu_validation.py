"""./dev gpu: everything only a GPU can show, in one command, within 8 minutes on one H100, with
no network: the doctor, the GPU tests, bench lif / memory / net and, when ``ncu`` is on the PATH,
DRAM throughput and achieved occupancy of each of our kernels.

    ./dev gpu                               # on a GPU machine: writes docs/results/gpu-<gpu>-<date>-<commit>/
    ./dev gpu --cpu-smoke --out /tmp/smoke  # the same pipeline on the CPU with small sizes (CI runs it)

Each stage runs in its own process with its own time budget; a stage that overruns is cut (its
process group killed), says so, and the next stage starts: a slow stage cannot eat the others.
The benchmarks write their rows as they finish, so a cut stage keeps what it measured. Stages
that need CUDA (the GPU tests, ncu) are skipped on the CPU, each saying so. Results:
``validation.json`` (every stage's status, seconds, command, log tail), ``summary.md`` (a short
digest) and each stage's own files, in a folder named by GPU, date and commit.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
# Seconds per stage on one H100 (sum 470 s, inside the 8-minute target); what a stage leaves
# unused passes to the next, so the total never exceeds the sum. doctor: on a fresh machine it
# builds the host kernels first (one g++ run, ~35-60 s). pytest -m gpu includes the cupy column
# of the tiny Table 1 runs (its fixture trains the CPU backends too). bench lif: 168 cases
# (7 T x 3 dtypes x 2 modes x 4 methods) at <= 0.5 s of timing each.
BUDGETS = {"doctor": 90, "pytest_gpu": 100, "bench_lif": 105, "bench_memory": 45, "bench_net": 50,
           "nccl_smoke": 40, "ncu": 40}
CPU_SMOKE_BUDGETS = {"doctor": 120, "pytest_gpu": 60, "bench_lif": 120, "bench_memory": 120, "bench_net": 180,
                     "nccl_smoke": 120, "ncu": 60}
NCU_METRICS = ("dram__throughput.avg.pct_of_peak_sustained_elapsed",
               "sm__warps_active.avg.pct_of_peak_sustained_active")


@dataclasses.dataclass
class Stage:
    name: str
    status: str = "pending"      # ok | failed | cut | skipped
    seconds: float = 0.0
    budget_s: float = 0.0
    reason: str = ""
    command: list = dataclasses.field(default_factory=list)
    log_tail: str = ""
    files: list = dataclasses.field(default_factory=list)


def run_process(stage: Stage, argv: list[str], budget: float, out: Path, env: Optional[dict] = None) -> Stage:
    """Run ``argv`` in its own process group with ``budget`` seconds; its output goes to
    out/<stage>.log. Overrun: the group is killed and the stage is 'cut'."""
    stage.command = [str(a) for a in argv]
    stage.budget_s = round(budget, 1)
    log_path = out / f"{stage.name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning", **(env or {})})
        try:
            code = proc.wait(timeout=budget)
            stage.status = "ok" if code == 0 else "failed"
            if code != 0:
                stage.reason = f"exit status {code}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            stage.status = "cut"
            stage.reason = f"overran its budget of {budget:.0f} s and was stopped; results written so far are kept"
    stage.seconds = round(time.perf_counter() - start, 1)
    stage.files.append(log_path.name)
    stage.log_tail = log_path.read_text(errors="replace")[-3000:]
    return stage


def python() -> str:
    return sys.executable


# ---------------------------------------------------------------- stages

def stage_doctor(ctx) -> Stage:
    stage = Stage("doctor")
    run_process(stage, [python(), "-m", "sj_temporal_fusion.doctor", "--json"], ctx.budget("doctor"), ctx.out)
    text = (ctx.out / "doctor.log").read_text()
    start = text.find("{")
    if start >= 0:
        try:
            report = json.loads(text[start:text.rindex("}") + 1])
            (ctx.out / "doctor.json").write_text(json.dumps(report, indent=1) + "\n")
            stage.files.append("doctor.json")
            if not report["ok"]:
                stage.reason = "doctor: NOT OK: " + "; ".join(
                    f"{d['device']}: {d.get('cause') or ', '.join(d.get('problems', []))}"
                    for d in report["devices"] if d["status"] == "fail")
        except (ValueError, KeyError):
            pass
    return stage


def stage_pytest_gpu(ctx) -> Stage:
    stage = Stage("pytest_gpu")
    if not ctx.cuda:
        return dataclasses.replace(stage, status="skipped",
                                   reason="CUDA only: the tests marked gpu need a CUDA device and CuPy")
    junit = ctx.out / "pytest-gpu.xml"
    run_process(stage, [python(), "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                        f"--junitxml={junit}", "tests"], ctx.budget("pytest_gpu"), ctx.out)
    stage.files.append(junit.name)
    counts = re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", stage.log_tail)
    if counts:
        stage.reason = (stage.reason + "; " if stage.reason else "") + ", ".join(f"{n} {w}" for n, w in counts)
    return stage


def _bench(ctx, stage: Stage, args: list[str], name: str) -> Stage:
    run_process(stage, [python(), "-m", "sj_temporal_fusion.bench", *args, "--out", str(ctx.out),
                        "--name", name, "--quiet", "--device", ctx.device], ctx.budget(stage.name), ctx.out)
    for suffix in (".json", ".csv"):
        if (ctx.out / f"{name}{suffix}").exists():
            stage.files.append(f"{name}{suffix}")
    return stage


def stage_bench_lif(ctx) -> Stage:
    if ctx.smoke:
        args = ["lif", "--neurons", "4099", "--T", "8,16", "--dtypes", "fp32,bf16", "--reps", "3",
                "--warmup", "1", "--max-seconds", "0.2", "--check-neurons", "1024", "--no-plots"]
    else:
        # N = 1,000,000, T = 8 ... 512 (the paper's Fig. 5), every method; 10 repetitions, 0.5 s each
        # case at most: 168 cases fit the budget, and the copy bandwidth is taken in the same run.
        args = ["lif", "--neurons", "1000000", "--T", "8..512", "--dtypes", "fp32,bf16,fp16",
                "--methods", "temporal_fusion,torch,cupy,serial", "--reps", "10", "--warmup", "2",
                "--max-seconds", "0.5"]
    return _bench(ctx, Stage("bench_lif"), args, f"lif-{ctx.device}")


def stage_bench_memory(ctx) -> Stage:
    if ctx.smoke:
        args = ["memory", "--models", "lif,resnet18", "--T", "4", "--neurons", "4099", "--batch", "2",
                "--image-size", "16", "--no-plots"]
    else:
        args = ["memory", "--models", "lif,resnet18", "--T", "32", "--neurons", "1000000", "--batch", "16",
                "--dtypes", "fp32,fp16"]
    return _bench(ctx, Stage("bench_memory"), args, f"memory-{ctx.device}")


def net_benchmark_available() -> bool:
    """Whether ``python -m sj_temporal_fusion.bench net`` exists in this checkout."""
    try:
        from sj_temporal_fusion.bench import __main__ as bench_cli
    except ImportError:
        return False
    return "net" in getattr(bench_cli, "BENCHMARKS", ())


def stage_bench_net(ctx) -> Stage:
    """Spiking-ResNet18 training and inference step per backend at T = 32: ``bench net`` where it
    exists, else a minimal stand-in (``experiments/gpu_validation.py --net-fallback``)."""
    stage = Stage("bench_net")
    T, batch = (4, 2) if ctx.smoke else (32, 32)
    if net_benchmark_available() and not ctx.force_net_fallback:
        args = ["net", "--models", "resnet18", "--T", str(T), "--batch", str(batch),
                "--methods", "torch,cupy,temporal_fusion", "--max-seconds", "20"]
        if ctx.smoke:  # the orchestration is under test, not the figures
            args += ["--reps", "1", "--min-reps", "1", "--warmup", "0", "--image-size", "16", "--no-profile",
                     "--no-plots"]
        else:
            args += ["--reps", "10", "--warmup", "3"]
        return _bench(ctx, stage, args, f"net-{ctx.device}")
    name = f"net-{ctx.device}"
    run_process(stage, [python(), str(Path(__file__).resolve()), "--net-fallback", "--device", ctx.device,
                        "--T", str(T), "--batch", str(batch), "--out", str(ctx.out), "--name", name],
                ctx.budget("bench_net"), ctx.out)
    stage.reason = (stage.reason + "; " if stage.reason else "") + (
        "bench net not in this checkout: minimal stand-in (train + infer step per backend)")
    if (ctx.out / f"{name}.json").exists():
        stage.files.append(f"{name}.json")
    return stage


NCU_SCRIPT = """
import torch, sj_temporal_fusion
from spikingjelly.activation_based import surrogate
x0 = torch.randn(32, 1_000_000, device="cuda") * 0.5 + 0.3
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = x0.to(dtype).requires_grad_()
    s = sj_temporal_fusion.lif_multi_step(x, tau=1.25, decay_input=False, v_threshold=0.3,
                                          surrogate_function=surrogate.Sigmoid(alpha=4.0))[0]
    s.backward(torch.ones_like(s))
torch.cuda.synchronize()
"""


def stage_ncu(ctx) -> Stage:
    stage = Stage("ncu")
    if not ctx.cuda:
        return dataclasses.replace(stage, status="skipped", reason="CUDA only: ncu profiles GPU kernels")
    ncu = shutil.which("ncu")
    if ncu is None:
        return dataclasses.replace(stage, status="skipped", reason="ncu is not on the PATH")
    csv_path = ctx.out / "ncu.csv"
    run_process(stage, [ncu, "--csv", "--metrics", ",".join(NCU_METRICS), "--kernel-name", "regex:lif_|shard_",
                        python(), "-c", NCU_SCRIPT], ctx.budget("ncu"), ctx.out)
    text = (ctx.out / "ncu.log").read_text(errors="replace")
    rows = parse_ncu_csv(text)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["kernel", "metric", "value", "unit"])
        writer.writeheader()
        writer.writerows(rows)
    stage.files.append(csv_path.name)
    if not rows and stage.status == "ok":
        stage.status, stage.reason = "failed", "ncu printed no metrics (permissions? see ncu.log)"
    return stage


def parse_ncu_csv(text: str) -> list[dict]:
    """(kernel, metric, value, unit) rows from ``ncu --csv`` output mixed with program output."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    if not lines:
        return []
    out = []
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        if row.get("Metric Name") in NCU_METRICS:
            out.append({"kernel": row.get("Kernel Name", ""), "metric": row["Metric Name"],
                        "value": row.get("Metric Value", ""), "unit": row.get("Metric Unit", "")})
    return out


def stage_nccl_smoke(ctx) -> Stage:
    """The single-GPU NCCL smoke run of the time-sharded node (docs/time_sharding.md): shard
    kernels on CUDA against the host build, a one-rank communicator's send/receive to itself, a
    lone receive that must time out, a one-rank TimeShardedNode against one device, all under
    -W error::DeprecationWarning; on the CPU its dry run."""
    stage = Stage("nccl_smoke")
    run_process(stage, [python(), "-W", "error::DeprecationWarning", "-m", "sj_temporal_fusion.distributed.smoke",
                        "--json", str(ctx.out / "nccl-smoke.json")] + ([] if ctx.cuda else ["--dry-run"]),
                ctx.budget("nccl_smoke"), ctx.out)
    stage.files.append("nccl-smoke.json")
    return stage


STAGES: list[tuple[str, Callable]] = [("doctor", stage_doctor), ("pytest_gpu", stage_pytest_gpu),
                                      ("bench_lif", stage_bench_lif), ("bench_memory", stage_bench_memory),
                                      ("bench_net", stage_bench_net), ("nccl_smoke", stage_nccl_smoke),
                                      ("ncu", stage_ncu)]


# ---------------------------------------------------------------- the stand-in for bench net

def net_fallback(args) -> int:
    """Spiking-ResNet18 one training step (forward + backward) and one inference step per backend,
    timed after warm-up; JSON to out/<name>.json."""
    import torch

    from sj_temporal_fusion.bench import harness, lif, memory
    from sj_temporal_fusion.compat import numpy_int_alias
    device = torch.device(args.device)
    rows = []
    for backend in ("torch", "cupy", "temporal_fusion"):
        for mode in ("train", "infer"):
            row = {"method": backend, "mode": mode, "T": args.T, "batch": args.batch}
            try:
                step = memory.setup_resnet18(backend, device, torch.float32, args.T, args.batch,
                                             16 if device.type == "cpu" else 32)
                if mode == "infer":
                    net = step.net
                    x = torch.rand(args.T, args.batch, 3, 16 if device.type == "cpu" else 32,
                                   16 if device.type == "cpu" else 32, device=device)

                    def step():
                        from spikingjelly.activation_based import functional
                        functional.reset_net(net)
                        with torch.no_grad():
                            return net.eval()(x)
                cuda = device.type == "cuda"
                with numpy_int_alias():
                    t = harness.time_fn(step, device, warmup=3 if cuda else 0, reps=5 if cuda else 1,
                                        min_reps=1, max_seconds=10)
                row.update(status="ok", **t.summary())
            except lif.Skip as exc:
                row.update(status="skipped", reason=str(exc))
            except Exception as exc:  # noqa: BLE001 - one backend failing must not end the stage
                row.update(status="error", reason=lif.error_reason(exc))
            rows.append(row)
            harness.write_json(Path(args.out) / f"{args.name}.json",
                               {"benchmark": "net (gpu_validation stand-in)", "model": "spiking_resnet18",
                                "environment": harness.environment(device), "results": rows})
    return 0


# ---------------------------------------------------------------- the run

@dataclasses.dataclass
class Context:
    out: Path
    device: str
    smoke: bool
    cuda: bool
    budgets: dict
    force_net_fallback: bool = False
    spare: float = 0.0  # seconds earlier stages left unused

    def budget(self, name: str) -> float:
        return self.budgets[name] + self.spare


def tag(gpu_name: str, commit: Optional[str], date: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    return f"gpu-{slug}-{date}-{(commit or 'nogit')[:10]}"


def summary_markdown(meta: dict, stages: list[Stage], out: Path) -> str:
    lines = [f"# GPU validation: {meta['device_name']}", "",
             f"- date (UTC) {meta['date_utc']}, commit {meta['commit'] or 'unknown'}"
             + (" (dirty)" if meta.get("dirty") else ""),
             f"- {'CPU smoke run (small sizes)' if meta['smoke'] else 'full run'}, total {meta['seconds']:.0f} s",
             "", "| stage | status | seconds / budget | note |", "|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} / {s.budget_s:.0f} | {s.reason.replace('|', '/')} |")
    lines += [""] + _lif_digest(out, meta) + _memory_digest(out, meta) + _net_digest(out, meta) + _ncu_digest(out)
    return "\n".join(lines) + "\n"


def _load(out: Path, name: str) -> Optional[dict]:
    path = out / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _lif_digest(out: Path, meta: dict) -> list[str]:
    data = _load(out, f"lif-{meta['device']}.json")
    if not data:
        return []
    rows = [r for r in data["results"] if r["status"] == "ok"]
    lines = [f"## bench lif (N = {data['config']['neurons']:,}; copy bandwidth "
             f"{data['copy_bandwidth']['gb_per_s']:.0f} GB/s){'' if data.get('complete', True) else ' - INCOMPLETE'}", "",
             "Median ms per layer call; x = time / temporal fusion's; 'of copy' = temporal fusion's design "
             "bytes / time as a fraction of the copy bandwidth.", "",
             "| mode | dtype | T | temporal_fusion | of copy | torch | cupy | serial |", "|---|---|---|---|---|---|---|---|"]
    by = {(r["mode"], r["dtype"], r["T"], r["method"]): r for r in rows}
    for mode, dtype, T in sorted({(r["mode"], r["dtype"], r["T"]) for r in rows}, key=lambda k: (k[0], k[1], k[2])):
        tf = by.get((mode, dtype, T, "temporal_fusion"))
        cells = [mode, dtype, str(T), f"{tf['median_ms']:.3f}" if tf else "-",
                 f"{tf['fraction_of_copy_bw']:.2f}" if tf else "-"]
        for m in ("torch", "cupy", "serial"):
            r = by.get((mode, dtype, T, m))
            cells.append(f"{r['median_ms']:.3f} ({r['speedup_of_temporal_fusion']:.1f}x)"
                         if r and r.get("speedup_of_temporal_fusion") else (f"{r['median_ms']:.3f}" if r else "-"))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [r for r in data["results"] if r["status"] not in ("ok", "skipped")]
    if errors:
        lines += ["", f"{len(errors)} cases failed: " + "; ".join(
            f"{r['method']} {r['mode']} {r['dtype']} T={r['T']}: {r.get('reason', '')}" for r in errors[:5])]
    return lines + [""]


def _memory_digest(out: Path, meta: dict) -> list[str]:
    data = _load(out, f"memory-{meta['device']}.json")
    if not data:
        return []
    lines = ["## bench memory (peak MiB of one training step)", "", "| model | method | dtype | peak MiB | note |",
             "|---|---|---|---|---|"]
    for r in data["results"]:
        peak = f"{r['peak_mib']:.1f}" if r.get("peak_mib") is not None else "-"
        lines.append(f"| {r['model']} | {r['method']} | {r['dtype']} | {peak} | {r['status']} {r.get('reason') or ''} |")
    return lines + [""]


def _net_digest(out: Path, meta: dict) -> list[str]:
    data = _load(out, f"net-{meta['device']}.json")
    if not data:
        return []
    lines = [f"## Spiking-ResNet18 step ({data.get('benchmark', 'net')})", "", "| method | mode | median ms | status |",
             "|---|---|---|---|"]
    for r in data.get("results", []):
        ms = f"{r['median_ms']:.2f}" if r.get("median_ms") is not None else "-"
        lines.append(f"| {r.get('method')} | {r.get('mode')} | {ms} | {r.get('status')} {r.get('reason') or ''} |")
    return lines + [""]


def _ncu_digest(out: Path) -> list[str]:
    path = out / "ncu.csv"
    if not path.exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    lines = ["## ncu (per kernel launch)", "", "| kernel | metric | value |", "|---|---|---|"]
    lines += [f"| `{r['kernel'][:60]}` | {r['metric']} | {r['value']} {r['unit']} |" for r in rows]
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="./dev gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--cpu-smoke", action="store_true", help="run the pipeline on the CPU with small sizes (CI)")
    p.add_argument("--out", default=None, help="results folder (default docs/results/gpu-<gpu>-<date>-<commit>)")
    p.add_argument("--stages", default=",".join(n for n, _ in STAGES), help="comma-separated subset")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every stage budget")
    p.add_argument("--net-fallback", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--force-net-fallback", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--name", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.net_fallback:
        return net_fallback(args)
    import torch

    from sj_temporal_fusion import environment
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        raise SystemExit("./dev gpu: torch sees no CUDA device here. On a GPU machine check "
                         "`python -m sj_temporal_fusion.doctor`; to exercise the pipeline on the CPU "
                         "use ./dev gpu --cpu-smoke")
    device = "cuda" if cuda else "cpu"
    device_name = torch.cuda.get_device_name(0) if cuda else f"{environment.cpu_model()} (CPU smoke)"
    git = environment.git_commit()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = Path(args.out) if args.out else ROOT / "docs" / "results" / tag(
        device_name if cuda else "cpu-smoke", git["commit"], date)
    out.mkdir(parents=True, exist_ok=True)
    budgets = {k: v * args.budget_scale for k, v in (CPU_SMOKE_BUDGETS if args.cpu_smoke else BUDGETS).items()}
    ctx = Context(out, device, args.cpu_smoke, cuda, budgets, args.force_net_fallback)
    wanted = [s for s in args.stages.split(",") if s]
    unknown = set(wanted) - {n for n, _ in STAGES}
    if unknown:
        raise SystemExit(f"unknown stages {', '.join(sorted(unknown))}: choose from {', '.join(n for n, _ in STAGES)}")
    meta = {"device": device, "device_name": device_name, "date_utc": environment.date_utc(),
            "commit": git["commit"], "dirty": git["dirty"], "smoke": args.cpu_smoke, "budgets_s": budgets,
            "environment": environment.collect(device)}
    stages, start = [], time.perf_counter()
    for name, fn in STAGES:
        if name not in wanted:
            continue
        print(f"[gpu] {name} (budget {ctx.budget(name):.0f} s) ...", flush=True)
        stage = fn(ctx)
        stages.append(stage)
        ctx.spare = 0.0 if stage.status == "cut" else max(0.0, ctx.budget(name) - stage.seconds)
        print(f"[gpu] {name}: {stage.status} in {stage.seconds:.0f} s" + (f" - {stage.reason}" if stage.reason else ""),
              flush=True)
        meta["seconds"] = time.perf_counter() - start
        (out / "validation.json").write_text(json.dumps(
            {**meta, "stages": [dataclasses.asdict(s) for s in stages]}, indent=1, default=str) + "\n")
        (out / "summary.md").write_text(summary_markdown(meta, stages, out))
    print(f"[gpu] wrote {out / 'summary.md'} and {out / 'validation.json'}")
    return 0 if all(s.status in ("ok", "skipped") for s in stages) else 1


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
