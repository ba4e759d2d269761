"""Regenerate Table 1: run configs x backends, then write table1.md, table1.csv and table1.png.

    python experiments/table1.py                                   # every cell, every backend
    python experiments/table1.py --configs configs/mnist_*.yaml --epochs 1
    python experiments/table1.py --dataset synthetic --max-batches 50   # timing only, no data
    python experiments/table1.py --from-runs runs/table1              # re-tabulate finished runs

Each run is a fresh ``experiments/train.py`` process (under torchrun with --nproc-per-node), so
one backend's compiled kernels, caches and memory peak do not leak into the next run's numbers.
Backend cupy runs where CuPy and a CUDA device are present and is skipped, with a note, elsewhere.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: import as a package
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import torch

from experiments import config as configs
from experiments import report

TRAIN = Path(__file__).resolve().parent / "train.py"
DEFAULT_BACKENDS = ("torch", "cupy", "temporal_fusion")
PASS_THROUGH = ("epochs", "max_batches", "dataset", "data_root", "device", "amp", "repeats")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--configs", nargs="+", type=Path,
                   help="config files (default: every cell in configs/)")
    p.add_argument("--backends", nargs="+", choices=configs.BACKENDS,
                   help="default: torch, cupy (where CuPy and a GPU are present), temporal_fusion")
    p.add_argument("--out", type=Path, default=Path("runs/table1"),
                   help="folder for the runs (<out>/<config>/<backend>/) and the table")
    p.add_argument("--from-runs", type=Path, metavar="DIR",
                   help="run nothing: tabulate the metrics.json files under DIR into --out")
    p.add_argument("--resume", action="store_true", help="skip runs whose metrics.json exists")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="processes per run, launched with torchrun (data parallel)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-batches", type=int)
    p.add_argument("--dataset", choices=configs.DATASETS)
    p.add_argument("--data-root")
    p.add_argument("--device")
    p.add_argument("--amp", choices=configs.AMP_MODES)
    p.add_argument("--repeats", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    return p


def cupy_usable(device: str) -> tuple[bool, str]:
    """Whether SpikingJelly's cupy backend can run here, and if not, why."""
    if importlib.util.find_spec("cupy") is None:
        return False, "CuPy is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if device == "cpu":
        return False, "--device cpu"
    return True, ""


def plan(args: argparse.Namespace) -> tuple[list[tuple[Path, str, dict]], list[str]]:
    """(config path, backend, resolved config) for every run, checked before anything runs;
    and notes on what was left out."""
    paths = args.configs or configs.cell_configs()
    overrides = dict(configs.parse_assignment(text) for text in args.set)
    overrides.update({k: getattr(args, k) for k in PASS_THROUGH if getattr(args, k) is not None})
    notes, backends = [], list(args.backends or DEFAULT_BACKENDS)
    if "cupy" in backends:
        ok, why = cupy_usable(overrides.get("device", "auto"))
        if not ok:
            if args.backends:
                raise SystemExit(f"table1: backend cupy asked for but it cannot run here ({why}); "
                                 f"drop it from --backends")
            backends.remove("cupy")
            notes.append(f"SpikingJelly's cupy backend was skipped: {why}")
    runs = [(path, backend, configs.load(path, {**overrides, "backend": backend}))
            for path in paths for backend in backends]
    return runs, notes


def command(path: Path, backend: str, out: Path, args: argparse.Namespace) -> list[str]:
    argv = [str(TRAIN), "--config", str(path), "--backend", backend, "--out", str(out)]
    for key in PASS_THROUGH:
        value = getattr(args, key)
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    for text in args.set:
        argv += ["--set", text]
    if args.no_progress:
        argv.append("--no-progress")
    if args.nproc_per_node > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.nproc_per_node}"] + argv
    return [sys.executable] + argv


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    notes: list[str] = []
    if args.from_runs is not None:
        results = report.load_runs(args.from_runs)
    else:
        try:
            runs, notes = plan(args)
        except configs.ConfigError as error:
            parser().error(str(error))
        failed, folders = [], []
        for i, (path, backend, config) in enumerate(runs, 1):
            out = args.out / config["name"] / backend
            folders.append(out)
            if args.resume and (out / "metrics.json").is_file():
                print(f"[{i}/{len(runs)}] {config['name']} / {backend}: done before, kept", flush=True)
                continue
            print(f"[{i}/{len(runs)}] {config['name']} / {backend} -> {out}", flush=True)
            (out / "metrics.json").unlink(missing_ok=True)  # a failed run must not leave an old result
            start = time.perf_counter()
            code = subprocess.run(command(path, backend, out, args)).returncode
            if code != 0:
                failed.append(f"{config['name']} / {backend} (exit {code}, log {out / 'train.log'})")
            print(f"[{i}/{len(runs)}] {'failed' if code else 'finished'} in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        notes += [f"run failed, left out: {f}" for f in failed]
        # This invocation's runs only: older runs elsewhere under --out stay out of the table.
        results = [run for folder in folders if (folder / "metrics.json").is_file()
                   for run in report.load_runs(folder)]
    try:
        table = report.build(results)
    except ValueError as error:  # no finished runs, or two runs of one cell
        print("\n".join(notes), file=sys.stderr)
        raise SystemExit(f"table1: {error}") from None
    table.notes += notes
    paths = report.write(table, args.out)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if any(n.startswith("run failed") for n in notes) else 0


if __name__ == "__main__":
    sys.exit(main())
