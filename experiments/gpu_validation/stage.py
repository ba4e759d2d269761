"""A stage of ./dev gpu: its own process group, a time budget, and the record of what happened."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]


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

    def note(self, text: str) -> None:
        self.reason = f"{self.reason}; {text}" if self.reason else text


@dataclasses.dataclass
class Context:
    out: Path
    device: str
    smoke: bool
    cuda: bool
    budgets: dict
    wanted: tuple = ()  # the stages this run runs
    spare: float = 0.0  # seconds earlier stages left unused

    def budget(self, name: str) -> float:
        return self.budgets[name] + self.spare


def python() -> str:
    return sys.executable


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
