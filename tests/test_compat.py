"""The numpy.int shim for SpikingJelly 0.0.0.0.14's cupy backend, shown on the CPU: its argument
check (``CKernel.check_ctypes``, the code its first launch runs) fails under this NumPy without
the shim and passes with it; the alias exists only inside the block."""
import threading
import types

import numpy as np
import pytest

from sj_temporal_fusion import compat

base = pytest.importorskip("spikingjelly.activation_based.auto_cuda.base")


class FakeCupyArray:
    """Stands in for the cupy.ndarray SpikingJelly passes as ``numel`` (no GPU needed)."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


@pytest.fixture
def kernel_args(monkeypatch):
    fake_cupy = types.SimpleNamespace(ndarray=FakeCupyArray)
    monkeypatch.setattr(base, "cupy", fake_cupy, raising=False)
    kernel = types.SimpleNamespace(cparams={"numel": "const int &"})
    return kernel, {"numel": FakeCupyArray(np.int64)}


def test_spikingjelly_cupy_check_fails_without_the_shim(kernel_args):
    if "int" in vars(np):
        pytest.skip(f"NumPy {np.__version__} still has np.int: nothing to show")
    kernel, py_dict = kernel_args
    with pytest.raises(AttributeError, match="int"):
        base.CKernel.check_ctypes(kernel, py_dict)
    assert compat.spikingjelly_uses_numpy_int().endswith("base.py:249")


def test_spikingjelly_cupy_check_passes_with_the_shim(kernel_args):
    kernel, py_dict = kernel_args
    had = "int" in vars(np)
    with compat.numpy_int_alias():
        base.CKernel.check_ctypes(kernel, py_dict)
        assert np.int is int
    assert ("int" in vars(np)) == had


def test_shim_is_nestable_wraps_functions_and_cleans_up_after_errors():
    had = "int" in vars(np)
    seen = []
    step = compat.with_numpy_int_alias(lambda: seen.append(np.int) or "done")
    with compat.numpy_int_alias():
        assert step() == "done"
        assert np.int is int  # the inner exit keeps the outer block's alias
    assert seen == [int] and ("int" in vars(np)) == had
    with pytest.raises(ZeroDivisionError):
        with compat.numpy_int_alias():
            1 / 0
    assert ("int" in vars(np)) == had
    threads = [threading.Thread(target=step) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ("int" in vars(np)) == had
