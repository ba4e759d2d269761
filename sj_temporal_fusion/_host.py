"""Host build of the kernels: one kernel variant (a name expression such as
``neuron_forward<LifModel, float, 9>``, the same one NVRTC compiles) per shared library, built by
g++ with OpenMP when first used and loaded through ctypes. Libraries are cached on disk with a
digest of their bytes beside them: a damaged one is rebuilt, not loaded. A file lock makes
parallel processes build each variant once."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from filelock import FileLock

from . import _cache

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
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_ARG_TYPES = {"acc32": ctypes.c_float, "acc64": ctypes.c_double, "int": ctypes.c_int, "ll": ctypes.c_longlong}
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


def variant_source(expression: str, count_bytes: bool) -> str:
    from .neurons import REGISTRY
    lines = [f'#include "neurons/{name}.cuh"' for name in REGISTRY]
    lines += ['#include "temporal.cu"', 'extern "C" {',
              f"int tf_launch(void** args, long long blocks, int threads) {{ "
              f"host_launch_packed(&{expression}, args, blocks, threads); return 0; }}"]
    if count_bytes:
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
              f"each); cached in {out_dir.parent}", file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=None)
def library(expression: str, emulate_gpu: bool = False, count_bytes: bool = False) -> ctypes.CDLL:
    """The compiled host library of one kernel variant, built on first use."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"the CPU path of sj_temporal_fusion compiles its kernels with a C++ compiler, and "
            f"'{compiler}' was not found: install g++ (Debian/Ubuntu: apt-get install g++) or set CXX")
    flags = _flags(emulate_gpu, count_bytes)
    source = variant_source(expression, count_bytes)
    key = hashlib.sha256("\0".join((sources_digest(), source, compiler, *flags, _cpu_tag())).encode())
    out_dir = cache_dir() / key.hexdigest()[:20]
    lib_path = out_dir / "libtf.so"
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir / "build.lock")):
        if not _cache.is_verified(lib_path):
            _announce(out_dir)
            src = out_dir / "variant.cpp"
            src.write_text(source)
            tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
            cmd = [compiler, *flags, f"-I{CSRC}", str(src), *LIBMVEC[1], "-o", str(tmp)]
            started = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"host build of kernel {expression} failed:\n{' '.join(cmd)}\n{proc.stderr}")
            _cache.commit(tmp, lib_path)
            if os.environ.get("SJ_TF_VERBOSE"):
                print(f"sj_temporal_fusion: built {expression} in {time.perf_counter() - started:.1f} s",
                      file=sys.stderr)
    lib = ctypes.CDLL(str(lib_path))
    lib.tf_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_longlong, ctypes.c_int]
    lib.tf_launch.restype = ctypes.c_int
    if count_bytes:
        lib.tf_read_bytes.restype = ctypes.c_ulonglong
        lib.tf_written_bytes.restype = ctypes.c_ulonglong
    return lib


def launch(expression: str, n: int, args, acc_is_double: bool, count_bytes: bool = False) -> ctypes.CDLL:
    """Run variant ``expression`` over ``n`` neurons; ``args`` are (kind, value) pairs in the
    kernel's parameter order, kinds ptr (tensor or None), acc, int, ll. Returns the library (the
    counting build's byte counters are read from it)."""
    lib = library(expression, _emulate_gpu, count_bytes)
    values = []
    for kind, value in args:
        if kind == "ptr":
            values.append(ctypes.c_void_p(None if value is None else value.data_ptr()))
        else:
            values.append(_ARG_TYPES[("acc64" if acc_is_double else "acc32") if kind == "acc" else kind](value))
    packed = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
    per_block = EMULATED_BLOCK * EMULATED_LANES if _emulate_gpu else LANES
    threads = 1 if count_bytes else torch.get_num_threads()
    if count_bytes:
        lib.tf_reset_byte_counts()
    lib.tf_launch(packed, max(1, -(-n // per_block)), threads)
    return lib
