"""GPU launches: each kernel variant's cubin (built and cached by ``_nvrtc``) loaded once per
device and launched on PyTorch's current stream of the tensor's device."""
from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch

from . import _nvrtc, kernel_params
# The launch shape in use and the NVRTC options it is compiled with (bench tune swaps all three
# here); source() and all_name_expressions() are _nvrtc's, named here for existing callers.
from ._nvrtc import (BLOCK, LANES, MISSING_CUPY, OPTIONS, all_name_expressions, import_cupy,  # noqa: F401
                     options_for, source)


@functools.lru_cache(maxsize=None)
def _function(expression: str, device_index: int):
    cupy = import_cupy()
    from cupy.cuda import function as cuda_function
    with cupy.cuda.Device(device_index) as device:
        cubin, mangled = _nvrtc.cubin(expression, device.compute_capability, OPTIONS)
        module = cuda_function.Module()
        module.load(cubin)
        return module, module.get_function(mangled)


# The numpy scalar CuPy passes for each ctypes type kernel_params packs: the same bytes.
_NUMPY = {ctypes.c_void_p: np.uint64, ctypes.c_int: np.int32, ctypes.c_longlong: np.int64,
          ctypes.c_float: np.float32, ctypes.c_double: np.float64}


def kernel_args(expression: str, args, acc_is_double: bool) -> tuple:
    """The kernel arguments of one launch: the parameters by name as the host build packs them
    (``kernel_params.values``), each as the numpy scalar of its C type."""
    return tuple(_NUMPY[ctype_t](value) for ctype_t, value in kernel_params.values(expression, args, acc_is_double))


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
    """Launch ``expression`` over ``n`` neurons on the current PyTorch stream of ``device``;
    ``args``: the kernel's parameters by name (``_host.launch``)."""
    cupy = import_cupy()
    packed = kernel_args(expression, args, acc_is_double)
    threads = -(-n // LANES)
    blocks = max(1, -(-threads // BLOCK))
    index = device.index if device.index is not None else torch.cuda.current_device()
    _, function = _function(expression, index)
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index), _cupy_stream(stream.cuda_stream, index):
        function((blocks,), (BLOCK,), packed)
