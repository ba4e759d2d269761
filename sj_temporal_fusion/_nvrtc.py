"""GPU build: csrc/temporal.cu compiled by NVRTC to sm_XY machine code (cubin), one kernel variant
at a time, cached on disk (``_cache``). Holds the build's options (launch shape, no FP
contraction, fp32 subnormals kept), the source, the variants CI compiles, the kernel sources the
code needs, and ``prebuild``, which compiles many variants in parallel before timed work.

NVRTC is reached through CuPy's bindings of its C API (``cupy.cuda.nvrtc``), behind one function
(``_compile_program``): CuPy has no public call that compiles for an architecture it is given
without a device (``cupy.cuda.compiler.compile_using_nvrtc`` picks ``-arch`` through a per-device
memoised query; ``RawModule`` appends ``-ftz=true``). Compiling needs no GPU, so CI checks the
machine code ``_cuda`` loads (``_sass`` reads ptxas's report of the same compile)."""
from __future__ import annotations

import functools
import hashlib
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional, Sequence

CSRC = Path(__file__).parent / "csrc"
# The shipped launch shape (``_cuda`` launches with it; bench tune swaps it there).
BLOCK = 256
LANES = 1
# Resident threads per SM the kernels are bounded for (__launch_bounds__): half of the 2,048 an
# sm_80 / sm_90 SM holds, which caps them at 64 registers at 256 threads per block.
MIN_RESIDENT_THREADS = 1024

# The CuPy releases whose NVRTC bindings this build was run against (createProgram ... getCUBIN
# have the same signatures in both); older than 13 is refused, newer ones are used when they
# still have every binding in NVRTC_BINDINGS.
CHECKED_CUPY = ("13.6.0", "14.2.0")
MIN_CUPY = (13, 0)
NVRTC_BINDINGS = ("createProgram", "addNameExpression", "compileProgram", "getLoweredName", "getProgramLog",
                  "getCUBIN", "destroyProgram", "getVersion", "NVRTCError")

MISSING_CUPY = ("a CUDA tensor was given but CuPy is not installed, and the GPU kernels of "
                "sj_temporal_fusion run through CuPy: pip install 'sj-temporal-fusion[cuda13]' "
                "(CUDA 13; '[cuda12]' for CUDA 12)")


def options_for(block: int, lanes: int) -> tuple:
    """NVRTC options of a launch shape. --fmad=false: no implicit FMA contraction, so results
    equal the host build bit for bit. -default-device: a kernel's body is a lambda (with_lanes in
    csrc/common/lanes.cuh), which NVRTC would otherwise take for host code."""
    return ("-std=c++17", "--fmad=false", "-default-device", f"-DTF_LANES={lanes}", f"-DTF_BLOCK={block}",
            f"-DTF_MIN_BLOCKS={max(1, MIN_RESIDENT_THREADS // block)}", f"-I{CSRC}")


OPTIONS = options_for(BLOCK, LANES)


class UnsupportedCuPy(RuntimeError):
    """The installed CuPy lacks the NVRTC bindings the GPU build compiles through."""

    def __init__(self, cause: str, fix: str):
        super().__init__(f"{cause}: {fix}")
        self.cause, self.fix = cause, fix


class NVRTCCompileError(RuntimeError):
    """NVRTC rejected the kernels; the message holds its log."""


def import_cupy():
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(MISSING_CUPY) from exc
    return cupy


def _version_tuple(version: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def _cupy_fix() -> str:
    try:
        import torch
        major = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else 13
    except (ImportError, AttributeError, ValueError):
        major = 13
    return f"pip install 'cupy-cuda{major}x>=13.6,<15'"


def nvrtc_module():
    """CuPy's NVRTC bindings (``cupy.cuda.nvrtc``), or UnsupportedCuPy naming the CuPy versions
    this build was checked against and the fix. Loads no library: whether NVRTC itself loads is
    ``nvrtc_version()``'s question."""
    cupy = import_cupy()
    try:
        from cupy.cuda import nvrtc
    except ImportError as exc:  # a CuPy build without CUDA bindings (e.g. ROCm without hiprtc)
        nvrtc, missing = None, [f"cupy.cuda.nvrtc ({exc})"]
    else:
        missing = [name for name in NVRTC_BINDINGS if not hasattr(nvrtc, name)]
    too_old = _version_tuple(cupy.__version__) < MIN_CUPY
    if missing or too_old:
        why = (f"CuPy >= {MIN_CUPY[0]} is required" if too_old else
               f"its cupy.cuda.nvrtc lacks {', '.join(missing)}")
        raise UnsupportedCuPy(
            f"CuPy {cupy.__version__} cannot build sj_temporal_fusion's GPU kernels: they compile through "
            f"CuPy's NVRTC bindings and {why} (checked against CuPy {' and '.join(CHECKED_CUPY)})", _cupy_fix())
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library CuPy loads; raises when it cannot load one."""
    return tuple(nvrtc_module().getVersion())


def _compile_program(nvrtc, source: str, options: Sequence[str], name_expressions: Sequence[str]):
    """(cubin bytes, {name expression: mangled name}, NVRTC log): the one place that calls CuPy's
    NVRTC bindings, a one-to-one mirror of NVRTC's C API (nvrtcCreateProgram ... nvrtcGetCUBIN),
    checked against CuPy 13.6.0 and 14.2.0 (``CHECKED_CUPY``). Each call owns its program and
    patches nothing, so threads may compile at once; compileProgram releases the GIL."""
    program = nvrtc.createProgram(source, "temporal_fusion.cu", [], [])
    try:
        for name in name_expressions:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, list(options))
        except nvrtc.NVRTCError as exc:
            raise NVRTCCompileError(
                f"NVRTC {'.'.join(map(str, nvrtc.getVersion()))} failed to compile {list(name_expressions)} "
                f"with options {' '.join(options)} ({exc}):\n{nvrtc.getProgramLog(program)}") from exc
        mapping = {name: nvrtc.getLoweredName(program, name) for name in name_expressions}
        return nvrtc.getCUBIN(program), mapping, nvrtc.getProgramLog(program)
    finally:
        nvrtc.destroyProgram(program)


def compile_options(options: Sequence[str], arch, verbose: bool = False) -> tuple:
    """Every option NVRTC gets: ``options``, -ftz=false (fp32 subnormals kept, as the host build
    keeps them; CuPy's RawModule would add -ftz=true), -arch=sm_<arch> (machine code: NVRTC runs
    ptxas itself, so this is what the device loads) and, with ``verbose``, ptxas's resource report
    in the log (it does not change the code)."""
    return (*options, "-ftz=false", f"-arch=sm_{arch}") + (("--ptxas-options=-v",) if verbose else ())


def compile_cubin(source: str, options: Sequence[str], name_expressions: Sequence[str], arch,
                  verbose: bool = False) -> tuple[bytes, dict, str]:
    """(cubin, {name expression: mangled name}, NVRTC log) of ``source`` for sm_<arch> ('90' or
    90). Raises NVRTCCompileError with NVRTC's log, UnsupportedCuPy, or a RuntimeError naming
    the architectures this NVRTC emits when sm_<arch> is not one of them."""
    nvrtc = nvrtc_module()
    arch = str(arch)
    supported = getattr(nvrtc, "getSupportedArchs", None)
    if supported is not None and int(arch) not in supported():
        raise RuntimeError(
            f"NVRTC {'.'.join(map(str, nvrtc.getVersion()))} cannot emit sm_{arch} machine code (it emits "
            f"{', '.join(f'sm_{a}' for a in supported())}): install the CuPy and torch of a CUDA that "
            f"supports this GPU (CUDA 13 from sm_75, CUDA 12 from sm_50)")
    return _compile_program(nvrtc, source, compile_options(options, arch, verbose), list(name_expressions))


@functools.lru_cache(maxsize=None)
def source() -> str:
    """Every registered model's header, then the kernels. The digest of csrc/ is stamped in, so a
    cache keyed on this text follows edits of any header."""
    from ._host import sources_digest
    from .neurons import REGISTRY
    includes = "".join(f'#include "neurons/{name}.cuh"\n' for name in REGISTRY)
    return f"// csrc sha256 {sources_digest()}\n{includes}#include \"temporal.cu\"\n"


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def kernel_sources(csrc: Optional[Path] = None) -> tuple[list[str], list[str]]:
    """(needed, missing): the files under ``csrc`` (default: the package's csrc/) that the builds
    read, as paths relative to it (the -I both builds pass), found by following the quoted
    #includes from temporal.cu and every registered model's header; ``missing`` are those absent."""
    from .neurons import REGISTRY
    csrc = CSRC if csrc is None else Path(csrc)
    todo = ["temporal.cu", *(f"neurons/{name}.cuh" for name in REGISTRY)]
    needed, missing = set(), set()
    while todo:
        rel = todo.pop()
        if rel in needed:
            continue
        needed.add(rel)
        path = csrc / rel
        if not path.is_file():
            missing.add(rel)
            continue
        todo += _INCLUDE.findall(path.read_text(errors="replace"))
    return sorted(needed), sorted(missing)


def all_name_expressions() -> list[str]:
    """The kernel variants CI compiles (NVRTC, then ptxas for sm_80 and sm_90). Forms, surrogates
    and dtypes vary independently in the code, so each value of each is compiled, not their
    product: per model, the forward and the fix-up in every FORM in fp32; the backward in every
    FORM (with parameter gradients: the most registers) and with every surrogate in fp32; the time-sharding
    backward in its first and last FORM; each kernel in its first and last FORM in fp16, bf16 and
    fp64; the BatchNorm-folded forward and backward (with parameter gradients) in every dtype. At
    run time a variant is compiled when first used."""
    import torch

    from .neurons import REGISTRY
    from .surrogate import DEFAULT_ID, SURROGATES
    from .variants import CUDA_TYPES, backward_variant, fixup_variant, forward_variant
    f32, others = torch.float32, (torch.float16, torch.bfloat16, torch.float64)
    names = []
    for m in REGISTRY.values():
        forward_forms = sorted({f & ~m.detach_bit for f in m.forms})
        ends = sorted({m.forms[0], m.forms[-1]})
        forward_ends = sorted({forward_forms[0], forward_forms[-1]})
        names += [forward_variant(m, f32, f) for f in forward_forms]
        names += [forward_variant(m, d, f) for d in others for f in forward_ends]
        if m.shardable:
            names += [fixup_variant(m, f32, f) for f in forward_forms]
            names += [fixup_variant(m, d, f) for d in others for f in forward_ends]
            names += [backward_variant(m, d, DEFAULT_ID, f, True, shard=True) for d in (f32, *others) for f in ends]
        names += [backward_variant(m, f32, DEFAULT_ID, f, True) for f in m.forms]  # the most registers
        names += [backward_variant(m, f32, DEFAULT_ID, f, False) for f in ends]
        names += [backward_variant(m, f32, s, m.forms[0], False) for s in range(len(SURROGATES)) if s != DEFAULT_ID]
        names += [backward_variant(m, d, DEFAULT_ID, f, g) for d in others for f in ends for g in (False, True)]
        # BatchNorm folded (FOLD): the affine read of x in every dtype, with the most registers
        # (parameter gradients) in the backward.
        names += [forward_variant(m, d, forward_forms[0], True) for d in CUDA_TYPES]
        names += [backward_variant(m, d, DEFAULT_ID, m.forms[0], True, True) for d in CUDA_TYPES]
    return names


# ---------------------------------------------------------------- the on-disk cubin cache

def cache_key(expression: str, arch, options: Sequence[str]) -> str:
    """What a cached cubin depends on: the source (with csrc/'s digest), the options, the variant,
    the architecture, CuPy's version and NVRTC's (cupy-cuda12x and cupy-cuda13x share version
    strings but not NVRTC)."""
    import cupy
    nvrtc = ".".join(map(str, nvrtc_version()))
    return hashlib.sha256("\0".join((source(), *options, expression, str(arch), cupy.__version__,
                                     f"nvrtc {nvrtc}")).encode()).hexdigest()


def _cached(entry: Path) -> Optional[tuple[bytes, str]]:
    from . import _cache
    binary = _cache.read_verified(entry / "kernel.cubin")
    name = _cache.read_verified(entry / "name") if binary is not None else None
    return None if name is None else (binary, name.decode())


def cubin(expression: str, arch, options: Optional[Sequence[str]] = None) -> tuple[bytes, str]:
    """(cubin, mangled name) of one variant for sm_<arch>, compiled once and cached on disk; a
    file lock per entry makes threads and processes asking for the same variant compile it once."""
    from filelock import FileLock

    from . import _cache
    options = tuple(OPTIONS if options is None else options)
    entry = _cache.root() / "cuda" / cache_key(expression, arch, options)[:24]
    found = _cached(entry)
    if found is not None:
        return found
    entry.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry / "build.lock")):
        found = _cached(entry)
        if found is None:
            binary, mapping, _ = compile_cubin(source(), options, [expression], arch)
            # The name first: an entry whose cubin is verified always has its name.
            _cache.write_verified(entry / "name", mapping[expression].encode())
            _cache.write_verified(entry / "kernel.cubin", binary)
            found = binary, mapping[expression]
    return found


def prebuild(expressions: Iterable[str], arch, jobs: Optional[int] = None,
             options: Optional[Sequence[str]] = None) -> float:
    """Compile and cache every variant in ``expressions`` for sm_<arch> in ``jobs`` threads
    (default: one per CPU this process may use; NVRTC releases the GIL), so later launches load
    them from the cache. Returns the wall time in seconds."""
    started = time.perf_counter()
    names = list(dict.fromkeys(expressions))
    if names:
        nvrtc_module()  # an unsupported CuPy fails once, not once per thread
        jobs = jobs or len(os.sched_getaffinity(0))
        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(names)))) as pool:
            for _ in pool.map(lambda name: cubin(name, arch, options), names):
                pass
    return time.perf_counter() - started
