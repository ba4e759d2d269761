"""Host build of the kernels: csrc/host_api.cpp (which includes lif.cu) compiled by g++ with
OpenMP into a shared library, loaded through ctypes. Built once per (source, flags, CPU) and
cached on disk, with a file lock so parallel processes build it once."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch
from filelock import FileLock

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("host_api.cpp", "lif.cu", "lif_core.cuh", "host_shim.h", "shard.cu")
# 64 contiguous lanes per emulated thread: the lane loop vectorises (fp32 forward at T=32,
# N=262,144 on 2 cores: 47 ms with one lane, 2.6 ms with 64).
LANES = 64
# FP contraction off: the host build must round exactly like NVRTC with --fmad=false.
# -fno-math-errno (with the `omp declare simd` expf in host_shim.h, linked against libmvec): the
# backward's surrogate derivative vectorises (fp32, T=32, N=262,144, 1 thread: 77 -> 31 ms).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=c++17",
         f"-DLIF_LANES={LANES}")
# glibc's vector math library (x86-64 Linux): SIMD expf/exp for the backward's lane loop.
LIBMVEC = (("-DLIF_LIBMVEC",), ("-lmvec",)) if (
    platform.system() == "Linux" and platform.machine() == "x86_64" and platform.libc_ver()[0] == "glibc") else ((), ())
FLAGS = FLAGS + LIBMVEC[0]
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

_P = ctypes.c_void_p
_D = ctypes.c_double
_I = ctypes.c_int
_LL = ctypes.c_longlong
_SIGNATURES = {
    "tf_lif_forward": [_I, _P, _P, _P, _P, _P, _P, _P, _D, _D, _D, _D, _I, _I, _I, _LL, _I],
    "tf_lif_backward": [_I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _D, _D, _D, _D, _D, _D,
                        _I, _I, _I, _LL, _I],
    # time sharding (csrc/shard.cu)
    "tf_shard_forward": [_I, _P, _P, _P, _P, _P, _P, _P, _D, _D, _D, _D, _I, _I, _I, _LL, _I],
    "tf_shard_fixup": [_I, _P, _P, _P, _P, _P, _P, _P, _P, _D, _D, _D, _D, _I, _I, _I, _LL, _I],
    "tf_shard_backward": [_I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _D, _D, _D, _D, _D,
                          _D, _I, _I, _I, _LL, _I],
}


def cache_dir() -> Path:
    root = os.environ.get("SJ_TF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sj_temporal_fusion")
    return Path(root) / "host"


def _cpu_tag() -> str:
    # -march=native: a library built on one CPU model must not be loaded on another.
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return platform.machine() + model


@functools.lru_cache(maxsize=None)
def library(count_bytes: bool = False) -> ctypes.CDLL:
    """The compiled host library (byte-counting variant when ``count_bytes``)."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"the CPU path of sj_temporal_fusion compiles its kernels with a C++ compiler, and "
            f"'{compiler}' was not found: install g++ (Debian/Ubuntu: apt-get install g++) or set CXX")
    flags = FLAGS + (("-DLIF_COUNT_BYTES",) if count_bytes else ())
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((CSRC / name).read_bytes())
    digest.update(" ".join((compiler,) + flags).encode())
    digest.update(_cpu_tag().encode())
    out_dir = cache_dir() / digest.hexdigest()[:16]
    lib_path = out_dir / ("libtf_count.so" if count_bytes else "libtf.so")
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lib_path) + ".lock"):
        if not lib_path.exists():
            tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
            cmd = [compiler, *flags, f"-I{CSRC}", str(CSRC / "host_api.cpp"), *LIBMVEC[1], "-o", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"host build of the LIF kernels failed:\n{' '.join(cmd)}\n{proc.stderr}")
            os.replace(tmp, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = _I
    if count_bytes:
        lib.tf_bytes_read.restype = ctypes.c_ulonglong
        lib.tf_bytes_written.restype = ctypes.c_ulonglong
    return lib


def call(name: str, *args, count_bytes: bool = False) -> None:
    """Run host kernel ``name`` (tf_lif_forward / tf_lif_backward) on torch's thread count."""
    threads = 1 if count_bytes else torch.get_num_threads()
    status = getattr(library(count_bytes), name)(*args, threads)
    if status != 0:
        raise RuntimeError(f"{name} rejected its arguments (status {status})")


def launch(entry: str, dtype: torch.dtype, surrogate_id: int | None, args, count_bytes: bool = False) -> None:
    """Run ``entry`` (tf_lif_forward / tf_lif_backward) with ``args`` given as (kind, value) pairs
    in the kernel's parameter order; kinds: ptr (tensor or None), acc, int, ll."""
    values = [DTYPE_CODES[dtype]] if surrogate_id is None else [DTYPE_CODES[dtype], surrogate_id]
    for kind, value in args:
        values.append(None if kind == "ptr" and value is None else value.data_ptr() if kind == "ptr" else value)
    call(entry, *values, count_bytes=count_bytes)
