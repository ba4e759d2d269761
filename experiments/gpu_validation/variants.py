"""The kernel variants the stages of ./dev gpu launch, and the prebuild that builds them, host and
GPU, in parallel before the timed stages.

Found, not listed: each stage's plan (``stages.py``) is its own command at tiny sizes, run here
under ``record --no-launch``, so the variants are those its code asks for (every launch passes
through ``ops.launch``), with nothing compiled. A plan whose workload stops early (a comparison
that fails on the zeroed outputs) may miss a variant: each stage records what it launches, and
its row names any variant that was not prebuilt.

    python -m experiments.gpu_validation.variants --out DIR --device cuda --stages bench_lif,...

writes DIR/variants.json ({stage: {build: [expression, ...]}}) and DIR/prebuild.json (counts and
seconds), printing the same.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import record
from .stage import ROOT, Context
from .stages import STAGES, VARIANTS_FILE

def plan(ctx: Context, names: list[str], timeout: float) -> dict[str, dict[str, list[str]]]:
    """{stage: {build: expressions}} for the stages ``names``, their plans run in parallel, each
    stopped after ``timeout`` seconds (what it recorded by then counts)."""
    plans = {name: fn for name, _, fn in STAGES if name in names and fn is not None}
    with tempfile.TemporaryDirectory(prefix="gpu-plan-") as tmp_dir:
        tmp = Path(tmp_dir)

        def one(name: str) -> dict[str, list[str]]:
            work = tmp / name
            work.mkdir()
            command = plans[name](ctx, work)
            if command is None:
                return {b: [] for b in record.BUILDS}
            log = work / "launched.txt"
            with open(ctx.out / f"prebuild-plan-{name}.log", "w") as out:
                try:
                    subprocess.run(command.recorded(log, launch=False), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   timeout=timeout)
                except subprocess.TimeoutExpired:
                    out.write(f"\n[plan of {name}: stopped after {timeout:.0f} s; what it recorded counts]\n")
            return record.read(log)

        with ThreadPoolExecutor(max_workers=max(1, len(plans))) as pool:
            return dict(zip(plans, pool.map(one, plans)))


def gpu_arch() -> str:
    """sm_XY of the current CUDA device as NVRTC and the launcher's cache name it: 'XY'."""
    import torch
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def build(variants: dict[str, dict[str, list[str]]], cuda: bool) -> dict:
    """Build every planned variant (host: g++ in batches, one per CPU; GPU: NVRTC, one per CPU)."""
    from sj_temporal_fusion import _cuda, _host, _nvrtc
    union = {b: list(dict.fromkeys(e for per_stage in variants.values() for e in per_stage[b])) for b in record.BUILDS}
    report = {"host_variants": len(union["host"]), "gpu_variants": len(union["gpu"])}
    started = time.perf_counter()
    report["host_seconds"] = _host.prebuild(union["host"]) if union["host"] else 0.0
    # With the launcher's options, so that its cache finds them (bench tune swaps them there).
    report["gpu_seconds"] = (_nvrtc.prebuild(union["gpu"], gpu_arch(), options=_cuda.OPTIONS)
                             if cuda and union["gpu"] else 0.0)
    report["build_seconds"] = time.perf_counter() - started
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.gpu_validation.variants", description=__doc__)
    p.add_argument("--out", required=True, help="the run's results folder")
    p.add_argument("--device", required=True, choices=("cpu", "cuda"))
    p.add_argument("--smoke", action="store_true", help="the CPU smoke run's stage arguments")
    p.add_argument("--stages", default="", help="comma-separated stages to plan for")
    p.add_argument("--plan-timeout", type=float, default=120.0, help="seconds per stage's plan (default 120)")
    args = p.parse_args(argv)
    out = Path(args.out)
    cuda = args.device == "cuda"
    ctx = Context(out, args.device, args.smoke, cuda, budgets={})
    started = time.perf_counter()
    variants = plan(ctx, [s for s in args.stages.split(",") if s], args.plan_timeout)
    plan_seconds = time.perf_counter() - started
    (out / VARIANTS_FILE).write_text(json.dumps(variants, indent=1) + "\n")
    for name, per_build in variants.items():
        print(f"[prebuild] {name}: {len(per_build['host'])} host, {len(per_build['gpu'])} GPU variants", flush=True)
    report = {"plan_seconds": plan_seconds, **build(variants, cuda)}
    (out / "prebuild.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"[prebuild] {report['host_variants']} host and {report['gpu_variants']} GPU variants: found in "
          f"{plan_seconds:.1f} s, built in {report['build_seconds']:.1f} s (host {report['host_seconds']:.1f} s, "
          f"GPU {report['gpu_seconds']:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
