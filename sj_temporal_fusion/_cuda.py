"""GPU build: csrc/lif.cu compiled by NVRTC through CuPy's RawModule, one compiled function per
(kernel, dtype, surrogate, device), launched on PyTorch's current stream of the tensor's device."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import torch

CSRC = Path(__file__).parent / "csrc"
CUDA_TYPES = {torch.float32: "float", torch.float64: "double", torch.float16: "f16_t",
              torch.bfloat16: "bf16_t"}
BLOCK = 256
LANES = 1
# --fmad=false: no implicit FMA contraction, so results equal the host build bit for bit.
OPTIONS = ("-std=c++17", "--fmad=false", f"-DLIF_LANES={LANES}", f"-I{CSRC}")
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
    # CuPy's compile cache keys on the source text, not on included headers: stamp the header in.
    core = (CSRC / "lif_core.cuh").read_bytes()
    return f"// lif_core.cuh sha256 {hashlib.sha256(core).hexdigest()}\n" + (CSRC / "lif.cu").read_text() + (
        "\n" + (CSRC / "shard.cu").read_text())  # time-sharding kernels, compiled after lif.cu


def name_expression(kernel: str, dtype: torch.dtype, surrogate_id: int | None = None) -> str:
    args = CUDA_TYPES[dtype] if surrogate_id is None else f"{CUDA_TYPES[dtype]}, {surrogate_id}"
    return f"{kernel}<{args}>"


def all_name_expressions() -> list[str]:
    """Every kernel variant the package can launch (what CI compiles with NVRTC)."""
    from .surrogate import SURROGATES
    names = [name_expression("lif_forward", d) for d in CUDA_TYPES]
    names += [name_expression("lif_backward", d, s) for d in CUDA_TYPES for s in range(len(SURROGATES))]
    names += [name_expression(k, d) for k in ("shard_forward", "shard_fixup") for d in CUDA_TYPES]
    names += [name_expression("shard_backward", d, s) for d in CUDA_TYPES for s in range(len(SURROGATES))]
    return names


@functools.lru_cache(maxsize=None)
def _function(expression: str, device_index: int):
    cupy = import_cupy()
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=source(), options=OPTIONS, name_expressions=[expression])
        return module.get_function(expression)


def _as_kernel_arg(kind: str, value, acc_dtype):
    if kind == "ptr":
        return np.uint64(0 if value is None else value.data_ptr())
    if kind == "acc":
        return acc_dtype(value)
    return np.int64(value) if kind == "ll" else np.int32(value)


def launch(expression: str, device: torch.device, n: int, args, acc_is_double: bool) -> None:
    """Launch ``expression`` over ``n`` neurons on the current PyTorch stream of ``device``."""
    cupy = import_cupy()
    acc_dtype = np.float64 if acc_is_double else np.float32
    kernel_args = tuple(_as_kernel_arg(kind, value, acc_dtype) for kind, value in args)
    threads = -(-n // LANES)
    blocks = max(1, -(-threads // BLOCK))
    index = device.index if device.index is not None else torch.cuda.current_device()
    function = _function(expression, index)
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
        function((blocks,), (BLOCK,), kernel_args)
