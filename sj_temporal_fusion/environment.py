"""What a result must carry to be compared, collected in one place: versions of the packages that
matter, the git commit of this checkout, the CPU and GPU. Used by the benchmarks
(``bench.harness.environment``), the experiments (``experiments.runtime.environment``), the
doctor and ``./dev gpu``."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]  # the checkout, when installed with pip install -e
PACKAGES = ("torch", "torchvision", "spikingjelly", "numpy", "cupy-cuda13x", "cupy-cuda12x", "cupy",
            "triton", "sj-temporal-fusion")


def package_version(name: str) -> Optional[str]:
    """Installed version of distribution ``name``, None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(names=PACKAGES) -> dict[str, Optional[str]]:
    return {name: package_version(name) for name in names}


def cupy_distributions() -> list[str]:
    """Installed CuPy wheels (cupy-cuda12x, cupy-cuda13x, cupy ...): more than one is a broken
    install, since they share the ``cupy`` import name."""
    found = set()
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "cupy" or name.startswith("cupy-cuda") or name.startswith("cupy-rocm"):
            found.add(name)
    return sorted(found)


def git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> dict:
    """{'commit': sha or None, 'dirty': tracked files modified (None without git)}."""
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(dirty) if commit else None}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu(device) -> dict:
    """Name, compute capability, memory and SM count of CUDA ``device``."""
    import torch
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory, "sm_count": props.multi_processor_count}


def date_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def collect(device=None) -> dict:
    """The common record: date, versions, commit, CPU, platform, and the GPU when ``device`` is
    a CUDA device."""
    import torch
    env = {"date_utc": date_utc(), "versions": {"python": platform.python_version(), **versions()},
           "cuda": torch.version.cuda, "git": git_commit(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device is not None and torch.device(device).type == "cuda":
        env["gpu"] = gpu(device)
    return env
