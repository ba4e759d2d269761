"""What each stage of ./dev gpu runs, its budget, and (``plan``) the same workload at tiny sizes
that ``variants.py`` runs to learn which kernel variants the stage launches. A stage and its plan
build their command from the same arguments; only sizes and repetitions differ, and no variant
name depends on them."""
from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from . import ncu, record
from .stage import ROOT, Context, Stage, python, run_process

# Seconds per stage on one H100 (sum 470 s, inside the 8-minute target); what a stage leaves
# unused passes to the next, so the total never exceeds the sum. doctor: on a fresh machine it
# builds its few host and GPU kernels itself. prebuild: the plans (each stage's command at tiny
# sizes, all at once; the slowest, bench net's, took 26 s alone on a loaded 2-core CPU), then
# every variant the later stages launch, host and GPU, built in parallel: the later budgets are
# spent testing and measuring. pytest -m gpu includes the cupy column of the tiny Table 1 runs
# (its fixture trains the CPU backends too). bench lif: 168 cases (7 T x 3 dtypes x 2 modes x 4
# methods) at <= 0.5 s of timing each. bench net: Spiking-ResNet18 and the Spikformer, training
# and inference, <= 10 s of timing per case (estimates, not yet measured on the GPU: 15 s of it
# came from nccl_smoke and ncu, whose runs are short workloads).
BUDGETS = {"doctor": 70, "prebuild": 90, "pytest_gpu": 60, "bench_lif": 90, "bench_memory": 45, "bench_net": 60,
           "nccl_smoke": 25, "ncu": 30}
CPU_SMOKE_BUDGETS = {"doctor": 120, "prebuild": 240, "pytest_gpu": 60, "bench_lif": 120, "bench_memory": 120,
                     "bench_net": 180, "nccl_smoke": 120, "ncu": 60}
VARIANTS_FILE = "variants.json"  # the prebuild's plan: {stage: {build: [expression, ...]}}


@dataclasses.dataclass(frozen=True)
class Command:
    """A python command line's ``target`` (-m MODULE ..., -c CODE ... or SCRIPT ...)."""
    target: tuple

    def recorded(self, log: Path, launch: bool = True) -> list[str]:
        """The command run under ``record``: its launches logged to ``log`` (``launch`` False:
        recorded only, nothing compiled or run)."""
        return [python(), "-m", "experiments.gpu_validation.record", "--log", str(log),
                *([] if launch else ["--no-launch"]), "--", *self.target]


def launched_log(ctx: Context, name: str) -> Path:
    return ctx.out / f"variants-{name}.txt"


def run_recorded(stage: Stage, ctx: Context, command: Command, prefix: tuple = ()) -> Stage:
    """Run ``command`` (after ``prefix``, e.g. a profiler) with its launches recorded; names in the
    stage's row any variant it launched that the prebuild did not build."""
    log = launched_log(ctx, stage.name)
    log.unlink(missing_ok=True)
    run_process(stage, [*prefix, *command.recorded(log)], ctx.budget(stage.name), ctx.out)
    if log.exists():
        stage.files.append(log.name)
    missing = not_prebuilt(ctx, log)
    if missing:
        stage.note(f"{len(missing)} variants launched that the prebuild did not build (compiled in this "
                   f"stage's time): " + ", ".join(f"{b} {e}" for b, e in missing[:3])
                   + (" ..." if len(missing) > 3 else ""))
    return stage


def not_prebuilt(ctx: Context, log: Path) -> list[tuple[str, str]]:
    """(build, expression) launched per ``log`` that no stage's plan held; [] when there was no
    prebuild in this run."""
    try:
        plan = json.loads((ctx.out / VARIANTS_FILE).read_text())
    except (OSError, ValueError):
        return []
    built = {(b, e) for per_stage in plan.values() for b, names in per_stage.items() for e in names}
    return [(b, e) for b, names in record.read(log).items() for e in names if (b, e) not in built]


# ---------------------------------------------------------------- doctor

def stage_doctor(ctx: Context) -> Stage:
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


# ---------------------------------------------------------------- prebuild

def stage_prebuild(ctx: Context) -> Stage:
    """``variants.py``: plan the later stages' variants, then build them in parallel."""
    stage = Stage("prebuild")
    later = [name for name, _, plan in STAGES if plan is not None and name in ctx.wanted]
    budget = ctx.budget("prebuild")
    # The plans get 60% of the budget, the builds the rest; a plan stopped early keeps what it found.
    run_process(stage, [python(), "-m", "experiments.gpu_validation.variants", "--out", str(ctx.out),
                        "--device", ctx.device, "--stages", ",".join(later), "--plan-timeout", f"{0.6 * budget:.0f}"]
                + (["--smoke"] if ctx.smoke else []), budget, ctx.out)
    try:
        report = json.loads((ctx.out / "prebuild.json").read_text())
    except (OSError, ValueError):
        return stage
    stage.files += [VARIANTS_FILE, "prebuild.json"]
    stage.note(f"{report['host_variants']} host and {report['gpu_variants']} GPU variants, found in "
               f"{report['plan_seconds']:.0f} s, built in {report['build_seconds']:.1f} s")
    return stage


# ---------------------------------------------------------------- pytest -m gpu

def pytest_gpu_command(ctx: Context, junit: Optional[Path] = None) -> Command:
    return Command(("-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                    *([f"--junitxml={junit}"] if junit else []), "tests"))


def plan_pytest_gpu(ctx: Context, tmp: Path) -> Optional[Command]:
    return pytest_gpu_command(ctx) if ctx.cuda else None


def stage_pytest_gpu(ctx: Context) -> Stage:
    stage = Stage("pytest_gpu")
    if not ctx.cuda:
        return dataclasses.replace(stage, status="skipped",
                                   reason="CUDA only: the tests marked gpu need a CUDA device and CuPy")
    junit = ctx.out / "pytest-gpu.xml"
    run_recorded(stage, ctx, pytest_gpu_command(ctx, junit))
    stage.files.append(junit.name)
    counts = re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", stage.log_tail)
    if counts:
        stage.note(", ".join(f"{n} {w}" for n, w in counts))
    return stage


# ---------------------------------------------------------------- benchmarks

# Sizes and repetitions the plan runs a benchmark with (appended: argparse keeps the last).
PLAN_SIZES = {
    "lif": ("--neurons", "1031", "--T", "4", "--reps", "1", "--warmup", "0", "--max-seconds", "0.01",
            "--check-neurons", "257", "--no-flush"),
    "memory": ("--neurons", "1031", "--T", "2", "--batch", "1", "--image-size", "16"),
    "net": ("--T", "2", "--batch", "2", "--image-size", "16", "--reps", "1", "--min-reps", "1", "--warmup", "0",
            "--max-seconds", "0.01", "--no-profile", "--dim", "16", "--depth", "1", "--heads", "2"),
}


def bench_lif_args(ctx: Context) -> list[str]:
    if ctx.smoke:
        return ["lif", "--neurons", "4099", "--T", "8,16", "--dtypes", "fp32,bf16", "--reps", "3",
                "--warmup", "1", "--max-seconds", "0.2", "--check-neurons", "1024", "--no-plots"]
    # N = 1,000,000, T = 8 ... 512 (the paper's Fig. 5), every method; 10 repetitions, 0.5 s each
    # case at most: 168 cases fit the budget, and the copy bandwidth is taken in the same run.
    return ["lif", "--neurons", "1000000", "--T", "8..512", "--dtypes", "fp32,bf16,fp16",
            "--methods", "temporal_fusion,torch,cupy,serial", "--reps", "10", "--warmup", "2", "--max-seconds", "0.5"]


def bench_memory_args(ctx: Context) -> list[str]:
    if ctx.smoke:
        return ["memory", "--models", "lif,resnet18", "--T", "4", "--neurons", "4099", "--batch", "2",
                "--image-size", "16", "--no-plots"]
    return ["memory", "--models", "lif,resnet18", "--T", "32", "--neurons", "1000000", "--batch", "16",
            "--dtypes", "fp32,fp16"]


def bench_net_args(ctx: Context) -> list[str]:
    """Spiking-ResNet18's and a Spikformer's (bench/spikformer.py: clock_driven nodes, dim 256, 2
    blocks, 8 heads) training and inference step per backend at T = 32."""
    T, batch = (4, 2) if ctx.smoke else (32, 32)
    args = ["net", "--models", "resnet18,spikformer", "--T", str(T), "--batch", str(batch),
            "--methods", "torch,cupy,temporal_fusion", "--max-seconds", "10"]
    if ctx.smoke:  # the orchestration is under test, not the figures
        return args + ["--reps", "1", "--min-reps", "1", "--warmup", "0", "--image-size", "16", "--no-profile",
                       "--no-plots", "--dim", "16", "--depth", "1", "--heads", "2"]
    return args + ["--reps", "10", "--warmup", "3", "--dim", "256", "--depth", "2", "--heads", "8"]


BENCH_ARGS = {"bench_lif": bench_lif_args, "bench_memory": bench_memory_args, "bench_net": bench_net_args}


def bench_command(ctx: Context, name: str, out: Path) -> Command:
    args = BENCH_ARGS[name](ctx)
    return Command(("-m", "sj_temporal_fusion.bench", *args, "--out", str(out), "--name", f"{args[0]}-{ctx.device}",
                    "--quiet", "--device", ctx.device))


def plan_bench(name: str) -> Callable[[Context, Path], Command]:
    def plan(ctx: Context, tmp: Path) -> Command:
        command = bench_command(ctx, name, tmp)
        return dataclasses.replace(command, target=command.target + PLAN_SIZES[BENCH_ARGS[name](ctx)[0]]
                                   + ("--no-plots",))
    return plan


def run_bench(name: str) -> Callable[[Context], Stage]:
    def run(ctx: Context) -> Stage:
        stage = Stage(name)
        run_recorded(stage, ctx, bench_command(ctx, name, ctx.out))
        stem = f"{BENCH_ARGS[name](ctx)[0]}-{ctx.device}"
        stage.files += [f"{stem}{s}" for s in (".json", ".csv") if (ctx.out / f"{stem}{s}").exists()]
        return stage
    return run


# ---------------------------------------------------------------- the NCCL smoke run

def nccl_smoke_command(ctx: Context, json_path: Path) -> Command:
    """The single-GPU NCCL smoke run of the time-sharded node (docs/time_sharding.md): shard
    kernels on CUDA against the host build, a one-rank communicator's send/receive to itself, a
    receive from itself without a send (NCCL refuses it at once), a one-rank TimeShardedNode
    against one device, each stage with DeprecationWarning as an error (the smoke run sets that
    itself: an interpreter-wide -W would also fail on SpikingJelly 0.0.0.0.14's import, whose
    @torch.jit.script torch 2.11 deprecates); on the CPU the same stages with NCCL emulated
    (test code)."""
    target = ("-m", "sj_temporal_fusion.distributed.smoke") if ctx.cuda else (str(ROOT / "tests" / "_smoke_on_cpu.py"),)
    return Command(target + ("--json", str(json_path)))


def plan_nccl_smoke(ctx: Context, tmp: Path) -> Command:
    command = nccl_smoke_command(ctx, tmp / "nccl-smoke.json")
    return dataclasses.replace(command, target=command.target + ("--n", "4099"))


def stage_nccl_smoke(ctx: Context) -> Stage:
    stage = Stage("nccl_smoke")
    run_recorded(stage, ctx, nccl_smoke_command(ctx, ctx.out / "nccl-smoke.json"))
    stage.files.append("nccl-smoke.json")
    return stage


# ---------------------------------------------------------------- ncu

def plan_ncu(ctx: Context, tmp: Path) -> Optional[Command]:
    return Command(("-c", ncu.workload(4099))) if ctx.cuda and shutil.which("ncu") else None


def stage_ncu(ctx: Context) -> Stage:
    stage = Stage("ncu")
    if not ctx.cuda:
        return dataclasses.replace(stage, status="skipped", reason="CUDA only: ncu profiles GPU kernels")
    profiler = shutil.which("ncu")
    if profiler is None:
        return dataclasses.replace(stage, status="skipped", reason="ncu is not on the PATH")
    run_recorded(stage, ctx, Command(("-c", ncu.workload(1_000_000))),
                 prefix=(profiler, "--csv", "--metrics", ",".join(ncu.METRICS), "--kernel-name", ncu.kernel_filter()))
    rows = ncu.parse_csv((ctx.out / "ncu.log").read_text(errors="replace"))
    csv_path = ctx.out / "ncu.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["kernel", "metric", "value", "unit"])
        writer.writeheader()
        writer.writerows(rows)
    stage.files.append(csv_path.name)
    if not rows and stage.status == "ok":
        stage.status, stage.reason = "failed", "ncu printed no metrics (permissions? see ncu.log)"
    return stage


# (name, run, plan): plan(ctx, tmp) -> the command whose launches are the stage's variants, None
# where the stage launches none here; doctor runs before the prebuild and has no plan.
STAGES: list[tuple[str, Callable[[Context], Stage], Optional[Callable[[Context, Path], Optional[Command]]]]] = [
    ("doctor", stage_doctor, None),
    ("prebuild", stage_prebuild, None),
    ("pytest_gpu", stage_pytest_gpu, plan_pytest_gpu),
    ("bench_lif", run_bench("bench_lif"), plan_bench("bench_lif")),
    ("bench_memory", run_bench("bench_memory"), plan_bench("bench_memory")),
    ("bench_net", run_bench("bench_net"), plan_bench("bench_net")),
    ("nccl_smoke", stage_nccl_smoke, plan_nccl_smoke),
    ("ncu", stage_ncu, plan_ncu),
]
