"""The kernel variants a process launches, recorded at ``sj_temporal_fusion.ops.launch`` (the one
place every kernel is launched), one line per variant and build: ``host<TAB>expression`` or
``gpu<TAB>expression``, written as each is first seen (a process that is killed keeps its lines).

    python [-W ...] -m experiments.gpu_validation.record --log FILE [--no-launch] -- -m MODULE ARGS...
    python [-W ...] -m experiments.gpu_validation.record --log FILE [--no-launch] -- -c CODE ARGS...
    python [-W ...] -m experiments.gpu_validation.record --log FILE [--no-launch] -- SCRIPT ARGS...

runs the command as ``python -m MODULE ...`` (``-c``, a script) would, with its launches recorded.
``--no-launch`` (planning): the variant is recorded but neither compiled nor run, and every tensor
the launch was handed is zeroed instead, so a workload's comparisons of two launches see equal
outputs and go on to its next launch.
"""
from __future__ import annotations

import argparse
import runpy
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

BUILDS = ("host", "gpu")


class LogFile:
    """A sink that appends each new (build, expression) to ``path``."""

    def __init__(self, path: Path):
        self.path, self.seen = Path(path), set()

    def __call__(self, build: str, expression: str) -> None:
        if (build, expression) not in self.seen:
            self.seen.add((build, expression))
            with open(self.path, "a") as f:
                f.write(f"{build}\t{expression}\n")


def read(path: Path) -> dict[str, list[str]]:
    """{build: expressions in first-launch order} of a log (empty when there is none)."""
    out: dict[str, dict[str, None]] = {b: {} for b in BUILDS}
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            build, _, expression = line.partition("\t")
            if build in out and expression:
                out[build][expression] = None
    return {b: list(names) for b, names in out.items()}


def _zero(value) -> None:
    import torch
    if isinstance(value, torch.Tensor):
        value.data.zero_()  # .data: no version bump, so autograd's saved-tensor checks stay quiet
    elif isinstance(value, (list, tuple)):
        for v in value:
            _zero(v)
    elif isinstance(value, dict):
        for v in value.values():
            _zero(v)


@contextmanager
def recording(sink: Callable[[str, str], None], launch: bool = True):
    """Within, every ``ops.launch`` reports (build, expression) to ``sink``; with ``launch``
    False it zeroes the launch's tensors instead of compiling and running the variant."""
    from sj_temporal_fusion import ops
    original = ops.launch

    def recorded(expression, x, *args, **kwargs):
        sink("gpu" if x.is_cuda else "host", expression)
        if launch:
            return original(expression, x, *args, **kwargs)
        _zero((x, args, kwargs))
        return None

    ops.launch = recorded
    try:
        yield
    finally:
        ops.launch = original


def run_target(target: list[str]) -> None:
    """Run ``target`` (``-m MODULE ...``, ``-c CODE ...`` or ``SCRIPT ...``) as python would."""
    if target[:1] == ["-m"] and len(target) >= 2:
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    elif target[:1] == ["-c"] and len(target) >= 2:
        sys.argv = ["-c", *target[2:]]
        exec(compile(target[1], "<string>", "exec"), {"__name__": "__main__"})
    elif target:
        sys.argv = list(target)
        runpy.run_path(target[0], run_name="__main__")
    else:
        raise SystemExit("record: nothing to run: give -- -m MODULE ..., -- -c CODE ... or -- SCRIPT ...")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("record: separate the command to run with --, e.g. record --log F -- -m pytest -q")
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m experiments.gpu_validation.record")
    p.add_argument("--log", required=True, help="file the (build, variant) lines are appended to")
    p.add_argument("--no-launch", action="store_true", help="record only: zero the tensors, compile nothing")
    args = p.parse_args(argv[:split])
    with recording(LogFile(Path(args.log)), launch=not args.no_launch):
        run_target(argv[split + 1:])


if __name__ == "__main__":
    main()
