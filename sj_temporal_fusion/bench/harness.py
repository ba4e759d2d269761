"""The shared harness of the benchmarks: timing, the device's copy bandwidth, the environment a
result is tagged with, progress, and the JSON / CSV writers. Each benchmark module (``lif``,
``memory``, ``traffic``) builds one setup per method and hands it here."""
from __future__ import annotations

import csv
import glob
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from .. import environment as shared_env

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Evicting the last-level cache between repetitions: the roofline assumes every byte comes from
# DRAM / HBM, and at T = 2 a 1M-neuron layer (8 MB fp32) would otherwise sit in a 50 MB H100 L2.
# On the CPU: twice the largest cache Linux reports (VMs report anything from 32 MiB to the
# host's whole 480 MiB L3), at least 64 MiB, at most 1 GiB.
CUDA_FLUSH_BYTES = 256 << 20


def cpu_last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache", default: int = 32 << 20) -> int:
    """The largest cache of CPU 0 in sysfs ('491520K'), or ``default`` where it says nothing."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for path in glob.glob(os.path.join(root, "index*", "size")):
        text = Path(path).read_text().strip()
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes, default=default)


def flush_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return CUDA_FLUSH_BYTES
    return min(max(2 * cpu_last_level_cache_bytes(), 64 << 20), 1 << 30)


def resolve_device(name: Optional[str]) -> torch.device:
    """'cuda' / 'cpu' / None (CUDA when present). Says what to do when CUDA is asked for but absent."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch sees no CUDA device here; "
                         "run with --device cpu, or on a machine with a GPU")
    return device


def parse_ints(text: str) -> list[int]:
    """'2,4,8' or '2..512' (powers of two from 2 to 512) -> list of ints."""
    if ".." in text:
        lo, hi = (int(v) for v in text.split(".."))
        out, v = [], lo
        while v <= hi:
            out.append(v)
            v *= 2
        return out
    return [int(v) for v in text.split(",") if v]


def parse_names(text: str, allowed: Iterable[str], what: str) -> list[str]:
    allowed = list(allowed)
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}: choose from {', '.join(allowed)}")
    return names


# ---------------------------------------------------------------- environment

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{shared_env.cpu_model()}, {os.cpu_count()} logical CPUs"


def environment(device: torch.device) -> dict:
    """What a result is tagged with: device, versions, commit, date, command, load
    (``sj_temporal_fusion.environment`` collects it; the layout is the benchmarks' own)."""
    common = shared_env.collect(device)
    git = common["git"]
    env = {
        "date_utc": common["date_utc"],
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": common["cpu"],
        "cpu_count": common["cpu_count"],
        "torch_threads": common["torch_threads"],
        "command": " ".join([os.path.basename(sys.executable), "-m", "sj_temporal_fusion.bench"] + sys.argv[1:]),
        "commit": None if git["commit"] is None else git["commit"] + ("-dirty" if git["dirty"] else ""),
        "python": common["versions"]["python"],
        "versions": {k: v for k, v in common["versions"].items() if k != "python"},
    }
    if device.type == "cuda":
        gpu = common["gpu"]
        env.update(cuda_runtime=torch.version.cuda, gpu_memory_bytes=gpu["memory_bytes"],
                   gpu_sm_count=gpu["sm_count"], gpu_capability=gpu["capability"])
    if hasattr(os, "getloadavg"):
        # Other work on the machine shows up here: a 2-core runner with load 2 halves every figure.
        env["loadavg_start"] = list(os.getloadavg())
    return env


def finish_environment(env: dict) -> dict:
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = list(os.getloadavg())
    return env


# ---------------------------------------------------------------- the CPU allocator

CPU_ALLOCATORS = ("system", "retain")


def configure_cpu_allocator(mode: str) -> str:
    """'system': glibc as configured. 'retain': glibc keeps freed memory mapped (no mmap for large
    blocks, no trimming), as PyTorch's caching allocator does on CUDA.

    Why it matters: torch's CPU allocator takes every block >= 32 MiB (glibc's mmap threshold cap)
    straight from mmap and gives it back on free, so each call that creates a (32, 262144) fp32
    output page-faults 8,192 fresh pages. On the 2-vCPU CI-class VM that costs ~10 ms per 32 MiB,
    more than the fused kernel itself (~3.5 ms), and SpikingJelly's eval loop pays it too
    (14 ms with 'retain', 25-90 ms with 'system', depending on the allocator's history)."""
    if mode == "system":
        return "system: glibc defaults"
    if mode != "retain":
        raise SystemExit(f"unknown --cpu-allocator {mode}: choose from {', '.join(CPU_ALLOCATORS)}")
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    mallopt = getattr(libc, "mallopt", None)
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # <malloc.h>
    if mallopt is None or not (mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2**31 - 1)
                               and mallopt(m_top_pad, 256 << 20)):
        raise SystemExit("--cpu-allocator retain needs glibc's mallopt; use --cpu-allocator system")
    return "retain: glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1, M_TOP_PAD=256 MiB"


# ---------------------------------------------------------------- timing

@dataclass
class Timing:
    """Per-repetition times of one setup, in milliseconds: ``samples_ms`` the kernel time (CUDA
    events around the call on GPU, perf_counter on CPU) and ``wall_samples_ms`` the host's wall
    time from the call until its work has finished (on CPU the two are the same reading)."""
    samples_ms: list[float] = field(default_factory=list)
    wall_samples_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile_ms(self, q: float) -> float:
        s = sorted(self.samples_ms)
        pos = q * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    def summary(self) -> dict:
        out = {"median_ms": self.median_ms, "p25_ms": self.quantile_ms(0.25),
               "p75_ms": self.quantile_ms(0.75), "min_ms": min(self.samples_ms),
               "max_ms": max(self.samples_ms), "reps": len(self.samples_ms)}
        if self.wall_samples_ms:
            out["wall_median_ms"] = statistics.median(self.wall_samples_ms)
        return out


class CacheFlusher:
    """Reads a buffer larger than the last-level cache, so the next repetition starts cold.
    Reading, not writing: a written buffer leaves dirty lines that the timed call would pay to
    write back."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.buffer = (torch.ones(flush_bytes(device) // 4, dtype=torch.int32, device=device)
                       if enabled else None)

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.max()  # reads every byte; the result is one element


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 20,
            max_seconds: float = 5.0, min_reps: int = 3, flush: Optional[CacheFlusher] = None) -> Timing:
    """Time ``fn`` after ``warmup`` calls: up to ``reps`` repetitions, stopping early once
    ``max_seconds`` of measured time have passed (never below ``min_reps``).

    Each repetition: flush, synchronise (the flush and all earlier work have finished), then
    time the call. CUDA: an event pair around the call gives the kernel time, and the host's
    perf_counter from just before the call until the end event has completed gives the wall
    time. Synchronising before the start event puts every method on the same footing: without
    it a method with less host overhead than the flush is enqueued behind it and timed
    kernel-only while the others are host-bound. CPU: perf_counter around the call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    timing = Timing()
    spent = 0.0
    for i in range(reps):
        if flush is not None:
            flush()
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            fn()
            end.record()
            end.synchronize()
            wall = time.perf_counter() - t0
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = wall = time.perf_counter() - t0
        timing.samples_ms.append(elapsed * 1e3)
        timing.wall_samples_ms.append(wall * 1e3)
        spent += elapsed
        if i + 1 >= min_reps and spent > max_seconds:
            break
    return timing


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, reps: int = 20) -> dict:
    """The device's measured copy bandwidth: ``dst.copy_(src)`` of ``nbytes`` (default: the cache
    flush's size, so source and destination together are 4x the last-level cache), counted as
    nbytes read + nbytes written, median of ``reps``."""
    if nbytes is None:
        nbytes = flush_bytes(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)  # touched, so no page faults are timed on CPU
    timing = time_fn(lambda: dst.copy_(src), device, warmup=3, reps=reps, max_seconds=5.0)
    median_s = timing.median_ms / 1e3
    return {"bytes_per_copy": 2 * nbytes, "gb_per_s": 2 * nbytes / median_s / 1e9,
            "best_gb_per_s": 2 * nbytes / (min(timing.samples_ms) / 1e3) / 1e9, **timing.summary()}


# ---------------------------------------------------------------- progress and writers

def progress(total: int, desc: str, enabled: bool = True):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    return path


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return path


def _csv_value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (benchmarks run headless)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, title: str, rect=(0, 0, 1, 0.93), fontsize: int = 10, dpi: int = 110) -> Path:
    """Title ``fig``, lay it out inside ``rect`` (room left for the title and any figure legend),
    write it to ``path`` and close it (pyplot keeps every open figure alive)."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
