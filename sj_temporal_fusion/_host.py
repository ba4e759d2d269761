"""Host build of the kernels: one kernel variant (a name expression such as
``neuron_forward<LifModel, float, 9>``, the same one NVRTC compiles) per shared library, built by
g++ with OpenMP when first used and loaded through ctypes. Libraries are cached on disk with a
digest of their bytes beside them: a damaged one is rebuilt, not loaded. A file lock makes
parallel processes build each variant once."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from filelock import FileLock, Timeout

from . import _cache, kernel_params

CSRC = Path(__file__).parent / "csrc"
# 64 contiguous lanes per emulated thread: the lane loop vectorises (fp32 forward at T=32,
# N=262,144 on 2 cores: 47 ms with one lane, 2.6 ms with 64).
LANES = 64
# The GPU's code shape on the CPU (TF_EMULATE_GPU): a few emulated threads per block, their lanes
# blockDim apart, unrolled guarded chunk loops, loads ahead. Slow; for tests only.
EMULATED_BLOCK, EMULATED_LANES = 4, 2
# FP contraction off: the host build must round exactly like NVRTC with --fmad=false.
# -fno-math-errno (with the `omp declare simd` expf in host_shim.h, linked against libmvec): the
# backward's surrogate derivative vectorises (fp32, T=32, N=262,144, 1 thread: 77 -> 31 ms).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-fopenmp",
         "-fPIC", "-shared", "-std=c++17")
# glibc's vector math library (x86-64 Linux): SIMD expf/exp for the lane loops.
LIBMVEC = (("-DTF_LIBMVEC",), ("-lmvec",)) if (
    platform.system() == "Linux" and platform.machine() == "x86_64" and platform.libc_ver()[0] == "glibc") else ((), ())
_emulate_gpu = False
_announced = False


def cache_dir() -> Path:
    return _cache.root() / "host"


@contextlib.contextmanager
def emulate_gpu_shape():
    """Run host kernels in the GPU's code shape (TF_EMULATE_GPU) inside this block."""
    global _emulate_gpu
    saved, _emulate_gpu = _emulate_gpu, True
    try:
        yield
    finally:
        _emulate_gpu = saved


def _cpu_tag() -> str:
    # -march=native: a library built on one CPU model must not be loaded on another.
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return platform.machine() + model


@functools.lru_cache(maxsize=None)
def sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(CSRC.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(CSRC).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# Bumped when the generated wrapper's shape changes (part of every cache key).
WRAPPER_VERSION = "2"
# Variants per g++ invocation in a prebuild: one build of 8 takes ~0.45x the time of 8 builds of
# one (the process, the headers and the link are paid once; measured on a 2-core VM).
BATCH = 8


@dataclasses.dataclass(frozen=True)
class _Variant:
    """One kernel variant of the host build: its cache directory and the exported symbol that
    launches it (named by the key, so one library can hold several variants). The cache folder is
    read when the variant is named, so a build in flight stays where it began."""
    expression: str
    emulate_gpu: bool
    count_bytes: bool
    root: Path = dataclasses.field(default_factory=lambda: cache_dir())

    @functools.cached_property
    def key(self) -> str:
        compiler = os.environ.get("CXX", "g++")
        flags = _flags(self.emulate_gpu, self.count_bytes)
        return hashlib.sha256("\0".join((WRAPPER_VERSION, sources_digest(), self.expression, compiler, *flags,
                                          _cpu_tag())).encode()).hexdigest()[:20]

    @property
    def symbol(self) -> str:
        return f"tf_launch_{self.key}"

    @property
    def directory(self) -> Path:
        return self.root / self.key

    @property
    def library_path(self) -> Path:
        return self.directory / "libtf.so"


def variant_source(variants: Sequence[_Variant]) -> str:
    """One translation unit exporting a launcher per variant (and, for counting builds, the byte
    counters, shared by the variants of the library: launches reset them)."""
    from .neurons import REGISTRY
    lines = [f'#include "neurons/{name}.cuh"' for name in REGISTRY]
    lines += ['#include "temporal.cu"', 'extern "C" {']
    lines += [f"int {v.symbol}(void** args, long long blocks, int threads) {{ "
              f"host_launch_packed(&{v.expression}, args, blocks, threads); return 0; }}" for v in variants]
    if any(v.count_bytes for v in variants):
        lines += ["void tf_reset_byte_counts() { tf_bytes_read = tf_bytes_written = 0; }",
                  "unsigned long long tf_read_bytes() { return tf_bytes_read; }",
                  "unsigned long long tf_written_bytes() { return tf_bytes_written; }"]
    return "\n".join(lines + ["}"]) + "\n"


def _flags(emulate_gpu: bool, count_bytes: bool) -> tuple:
    lanes = (f"-DTF_LANES={EMULATED_LANES}", "-DTF_EMULATE_GPU", f"-DTF_EMU_BLOCK={EMULATED_BLOCK}") \
        if emulate_gpu else (f"-DTF_LANES={LANES}",)
    return FLAGS + LIBMVEC[0] + lanes + (("-DTF_COUNT_BYTES",) if count_bytes else ())


def _announce(out_dir: Path) -> None:
    global _announced
    if not _announced:
        _announced = True
        print(f"sj_temporal_fusion: compiling CPU kernels with g++ as each is first used (a few seconds "
              f"each); cached in {out_dir}", file=sys.stderr, flush=True)


def _compiler() -> str:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"the CPU path of sj_temporal_fusion compiles its kernels with a C++ compiler, and "
            f"'{compiler}' was not found: install g++ (Debian/Ubuntu: apt-get install g++) or set CXX")
    return compiler


def _build(variants: Sequence[_Variant]) -> None:
    """Compile ``variants`` (same flags) into one library and commit it as each one's cached
    library; the caller holds each variant's lock."""
    compiler, first = _compiler(), variants[0]
    _announce(first.root)
    work = first.directory / f"build.{os.getpid()}.{threading.get_ident()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        src, lib = work / "variants.cpp", work / "libtf.so"
        src.write_text(variant_source(variants))
        cmd = [compiler, *_flags(first.emulate_gpu, first.count_bytes), f"-I{CSRC}", str(src), *LIBMVEC[1],
               "-o", str(lib)]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            names = ", ".join(v.expression for v in variants)
            raise RuntimeError(f"host build of kernel {names} failed:\n{' '.join(cmd)}\n{proc.stderr}")
        for v in variants:
            tmp = v.directory / f"libtf.{os.getpid()}.{threading.get_ident()}.tmp"
            try:  # one file for the batch: the dynamic loader maps it once for all its variants
                os.link(lib, tmp)
            except OSError:
                shutil.copyfile(lib, tmp)
            _cache.commit(tmp, v.library_path)
        if os.environ.get("SJ_TF_VERBOSE"):
            print(f"sj_temporal_fusion: built {len(variants)} host variant(s) in "
                  f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _lock(v: _Variant) -> FileLock:
    v.directory.mkdir(parents=True, exist_ok=True)
    return FileLock(str(v.directory / "build.lock"))


@functools.lru_cache(maxsize=None)
def library(expression: str, emulate_gpu: bool = False, count_bytes: bool = False) -> tuple[ctypes.CDLL, Callable]:
    """(library, launcher) of one kernel variant, built on first use (or found built by
    ``prebuild``)."""
    v = _Variant(expression, emulate_gpu, count_bytes)
    _compiler()
    with _lock(v):
        if not _cache.is_verified(v.library_path):
            _build([v])
    lib = ctypes.CDLL(str(v.library_path))
    launcher = getattr(lib, v.symbol)
    launcher.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_longlong, ctypes.c_int]
    launcher.restype = ctypes.c_int
    if count_bytes:
        lib.tf_read_bytes.restype = ctypes.c_ulonglong
        lib.tf_written_bytes.restype = ctypes.c_ulonglong
    return lib, launcher


def _build_unclaimed(batch: Sequence[_Variant]) -> int:
    """Build the variants of ``batch`` that are neither cached nor being built by someone else
    (their lock is taken without waiting, so batches never wait on each other); returns how many
    were built."""
    with contextlib.ExitStack() as held:
        mine = []
        for v in batch:
            lock = _lock(v)
            try:
                held.enter_context(lock.acquire(timeout=0))
            except Timeout:
                continue
            if not _cache.is_verified(v.library_path):
                mine.append(v)
        if mine:
            _build(mine)
        return len(mine)


def prebuild(expressions: Iterable[str], emulate_gpu: bool = False, count_bytes: bool = False,
             jobs: Optional[int] = None) -> float:
    """Build the not yet cached ``expressions`` ahead of use, ``BATCH`` per g++ invocation and
    ``jobs`` (default: the CPUs this process may use) invocations at a time. Returns the seconds
    it took. A variant another process is building is left to it; ``library`` then waits for it."""
    started = time.perf_counter()
    _compiler()
    todo = [v for v in dict.fromkeys(_Variant(e, emulate_gpu, count_bytes) for e in expressions)
            if not _cache.is_verified(v.library_path)]
    if todo:
        jobs = jobs or len(os.sched_getaffinity(0))
        # Batches no larger than an even share per job, so every job has work.
        size = max(1, min(BATCH, -(-len(todo) // jobs)))
        batches = [todo[i:i + size] for i in range(0, len(todo), size)]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(_build_unclaimed, batches))
    return time.perf_counter() - started


def launch(expression: str, n: int, args, acc_is_double: bool, count_bytes: bool = False) -> ctypes.CDLL:
    """Run variant ``expression`` over ``n`` neurons; ``args`` maps each of the kernel's parameters
    to its value by name (``kernel_params.FIELDS``: a tensor or None for a pointer, a number
    otherwise). Returns the library (the counting build's byte counters are read from it)."""
    lib, launcher = library(expression, _emulate_gpu, count_bytes)
    values = kernel_params.pack(expression, args, acc_is_double)
    # cuLaunchKernel's convention, as host_launch_packed reads it: a pointer to each parameter.
    packed = (ctypes.c_void_p * len(values))(*map(ctypes.addressof, values))
    per_block = EMULATED_BLOCK * EMULATED_LANES if _emulate_gpu else LANES
    threads = 1 if count_bytes else torch.get_num_threads()
    if count_bytes:
        lib.tf_reset_byte_counts()
    launcher(packed, max(1, -(-n // per_block)), threads)
    return lib
