import os
import sys

import pytest
import torch

# Tests run on the CPU host build unless marked gpu; keep them deterministic and quick.
torch.manual_seed(0)

STATE_DTYPE = {torch.float32: torch.float32, torch.float64: torch.float64,
               torch.float16: torch.float32, torch.bfloat16: torch.float32}


def has_cuda() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    reason = "needs a CUDA device and CuPy (this machine has " + (
        "no CUDA device)" if not torch.cuda.is_available() else "no CuPy)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def require_nvrtc():
    """CuPy's NVRTC module, or a skip naming why it cannot be loaded (CuPy missing, or its NVRTC
    library not loadable): the tests that compile GPU kernels without a GPU need it."""
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception as exc:
        pytest.skip(f"CuPy's NVRTC cannot be loaded here: {exc!r}")
    return nvrtc
