"""GPU build: csrc/temporal.cu compiled by NVRTC through CuPy's compiler (``_sass.compile_cubin``:
CuPy's options without its ``-ftz=true``, so fp32 subnormals round as on the host), one cubin per
(kernel variant, architecture), cached on disk and loaded per device, launched on PyTorch's
current stream of the tensor's device."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import torch

from .variants import CUDA_TYPES

CSRC = Path(__file__).parent / "csrc"
BLOCK = 256
LANES = 1
# Resident threads per SM the kernels are bounded for (__launch_bounds__): half of the 2,048 an
# sm_80 / sm_90 SM holds, which caps them at 64 registers at 256 threads per block.
MIN_RESIDENT_THREADS = 1024


def options_for(block: int, lanes: int) -> tuple:
    """NVRTC options of a launch shape. --fmad=false: no implicit FMA contraction, so results
    equal the host build bit for bit. -default-device: a kernel's body is a lambda (with_lanes in
    csrc/common/lanes.cuh), which NVRTC would otherwise take for host code."""
    return ("-std=c++17", "--fmad=false", "-default-device", f"-DTF_LANES={lanes}", f"-DTF_BLOCK={block}",
            f"-DTF_MIN_BLOCKS={max(1, MIN_RESIDENT_THREADS // block)}", f"-I{CSRC}")


OPTIONS = options_for(BLOCK, LANES)
MISSING_CUPY = ("a CUDA tensor was given but CuPy is not installed, and the GPU kernels of "
                "sj_temporal_fusion run through CuPy: pip install 'sj-temporal-fusion[cuda13]' "
                "(CUDA 13; '[cuda12]' for CUDA 12)")


def import_cupy():
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(MISSING_CUPY) from exc
    return cupy


@functools.lru_cache(maxsize=None)
def source() -> str:
    """Every registered model's header, then the kernels. CuPy's compile cache keys on the source
    text, not on included headers: the digest of csrc/ is stamped in."""
    from ._host import sources_digest
    from .neurons import REGISTRY
    includes = "".join(f'#include "neurons/{name}.cuh"\n' for name in REGISTRY)
    return f"// csrc sha256 {sources_digest()}\n{includes}#include \"temporal.cu\"\n"


def all_name_expressions() -> list[str]:
    """The kernel variants CI compiles (NVRTC, then ptxas for sm_80 and sm_90). Forms, surrogates
    and dtypes vary independently in the code, so each value of each is compiled, not their
    product: per model, the forward and the fix-up in every FORM in fp32; the backward in every
    FORM (with parameter gradients: the most registers) and with every surrogate in fp32; the time-sharding
    backward in its first and last FORM; each kernel in its first and last FORM in fp16, bf16 and
    fp64; the BatchNorm-folded forward and backward (with parameter gradients) in every dtype. At
    run time a variant is compiled when first used."""
    from .neurons import REGISTRY
    from .surrogate import DEFAULT_ID, SURROGATES
    from .variants import backward_variant, fixup_variant, forward_variant
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


def _compiled(expression: str, arch: str) -> tuple[bytes, str]:
    """(cubin, mangled name) of one variant for sm_<arch>, compiled once and cached on disk."""
    import cupy
    from . import _cache, _sass
    key = hashlib.sha256("\0".join((source(), *OPTIONS, expression, arch, cupy.__version__)).encode()).hexdigest()
    path = _cache.root() / "cuda" / key[:24]
    cached = _cache.read_verified(path / "kernel.cubin")
    if cached is not None and (path / "name").exists():
        return cached, (path / "name").read_text()
    cubin, mapping, _ = _sass.compile_cubin(source(), OPTIONS, [expression], arch, verbose=False)
    _cache.write_verified(path / "kernel.cubin", cubin)
    (path / "name").write_text(mapping[expression])
    return cubin, mapping[expression]


@functools.lru_cache(maxsize=None)
def _function(expression: str, device_index: int):
    cupy = import_cupy()
    from cupy.cuda import function as cuda_function
    with cupy.cuda.Device(device_index) as device:
        cubin, mangled = _compiled(expression, device.compute_capability)
        module = cuda_function.Module()
        module.load(cubin)
        return module, module.get_function(mangled)


def _as_kernel_arg(kind: str, value, acc_dtype):
    if kind == "ptr":
        return np.uint64(0 if value is None else value.data_ptr())
    if kind == "acc":
        return acc_dtype(value)
    return np.int64(value) if kind == "ll" else np.int32(value)


class _StreamHandle:
    """A raw stream pointer in the CUDA stream protocol (``__cuda_stream__``: version 0, pointer)."""

    def __init__(self, pointer: int):
        self.pointer = pointer

    def __cuda_stream__(self):
        return (0, self.pointer)


@functools.lru_cache(maxsize=64)
def _cupy_stream(stream_ptr: int, device_index: int):
    """A CuPy view of PyTorch's stream, built once per stream. CuPy 14 deprecates
    cupy.cuda.ExternalStream (a DeprecationWarning per construction); its replacement,
    cupy.cuda.Stream.from_external, takes any object with ``__cuda_stream__``. CuPy 13 has only
    ExternalStream."""
    cupy = import_cupy()
    with cupy.cuda.Device(device_index):
        if hasattr(cupy.cuda.Stream, "from_external"):
            return cupy.cuda.Stream.from_external(_StreamHandle(stream_ptr))
        return cupy.cuda.ExternalStream(stream_ptr, device_index)


def launch(expression: str, device: torch.device, n: int, args, acc_is_double: bool) -> None:
    """Launch ``expression`` over ``n`` neurons on the current PyTorch stream of ``device``."""
    cupy = import_cupy()
    acc_dtype = np.float64 if acc_is_double else np.float32
    kernel_args = tuple(_as_kernel_arg(kind, value, acc_dtype) for kind, value in args)
    threads = -(-n // LANES)
    blocks = max(1, -(-threads // BLOCK))
    index = device.index if device.index is not None else torch.cuda.current_device()
    _, function = _function(expression, index)
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index), _cupy_stream(stream.cuda_stream, index):
        function((blocks,), (BLOCK,), kernel_args)
