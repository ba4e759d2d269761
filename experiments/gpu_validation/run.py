"""./dev gpu's command line and the run: which stages, their budgets, the results folder, and
validation.json / summary.md rewritten after every stage."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import time
from pathlib import Path
from typing import Optional

from . import __doc__ as PACKAGE_DOC
from .stage import ROOT, Context
from .stages import BUDGETS, CPU_SMOKE_BUDGETS, STAGES
from .summary import summary_markdown


def tag(gpu_name: str, commit: Optional[str], date: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    return f"gpu-{slug}-{date}-{(commit or 'nogit')[:10]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="./dev gpu", description=PACKAGE_DOC.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=PACKAGE_DOC.split("\n\n", 1)[1])
    p.add_argument("--cpu-smoke", action="store_true", help="run the pipeline on the CPU with small sizes (CI)")
    p.add_argument("--out", default=None, help="results folder (default docs/results/gpu-<gpu>-<date>-<commit>)")
    p.add_argument("--stages", default=",".join(n for n, _, _ in STAGES), help="comma-separated subset")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every stage budget")
    args = p.parse_args(argv)
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
    wanted = tuple(s for s in args.stages.split(",") if s)
    unknown = set(wanted) - {n for n, _, _ in STAGES}
    if unknown:
        raise SystemExit(f"unknown stages {', '.join(sorted(unknown))}: choose from "
                         f"{', '.join(n for n, _, _ in STAGES)}")
    ctx = Context(out, device, args.cpu_smoke, cuda, budgets, wanted)
    meta = {"device": device, "device_name": device_name, "date_utc": environment.date_utc(),
            "commit": git["commit"], "dirty": git["dirty"], "smoke": args.cpu_smoke, "budgets_s": budgets,
            "environment": environment.collect(device)}
    stages, start = [], time.perf_counter()
    for name, fn, _ in STAGES:
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
