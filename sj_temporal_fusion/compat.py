"""Compatibility shims for running SpikingJelly 0.0.0.0.14's own cupy backend, which this
package compares itself with (benchmarks, Table 1, GPU tests). Nothing in the temporal_fusion
backend needs them.

SpikingJelly 0.0.0.0.14's cupy backend checks its kernel arguments with ``np.int``
(``spikingjelly/activation_based/auto_cuda/base.py``, ``CKernel.check_ctypes``), an alias NumPy
removed in 1.24; CuPy 14 needs NumPy >= 2, so the backend raises ``AttributeError: module
'numpy' has no attribute 'int'`` on its first launch (SpikingJelly issues #583 / #595, fixed on
its master only). ``numpy_int_alias()`` puts the alias back (``numpy.int = int``, what it was
before 1.24) only while the block runs, and removes it afterwards, so the rest of the process
keeps NumPy's behaviour.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import threading
from pathlib import Path
from typing import Callable, Optional

import numpy

_lock = threading.Lock()
_depth = 0
_added = False

NUMPY_INT_FIX = ("wrap the calls into SpikingJelly's cupy backend in "
                 "`with sj_temporal_fusion.compat.numpy_int_alias():` (sets numpy.int = int only while "
                 "the block runs), or install SpikingJelly from its master branch, which no longer uses "
                 "np.int; backend='temporal_fusion' is not affected")


@contextlib.contextmanager
def numpy_int_alias():
    """Within the block ``numpy.int`` is ``int`` (if this NumPy lacks it); nestable, thread-safe."""
    global _depth, _added
    with _lock:
        if _depth == 0 and "int" not in vars(numpy):
            numpy.int = int
            _added = True
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _added:
                del numpy.int
                _added = False


def with_numpy_int_alias(fn: Callable) -> Callable:
    """``fn`` run inside ``numpy_int_alias()`` (for a benchmark step of the cupy backend)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with numpy_int_alias():
            return fn(*args, **kwargs)
    return wrapped


def spikingjelly_uses_numpy_int() -> Optional[str]:
    """'file:line' where the installed SpikingJelly's cupy backend uses ``np.int`` while this NumPy
    has no such alias (the failure the shim is for); None when there is nothing to fix."""
    if "int" in vars(numpy):
        return None
    try:
        import importlib.util
        spec = importlib.util.find_spec("spikingjelly.activation_based.auto_cuda.base")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin)
    for node in ast.walk(ast.parse(path.read_text())):  # code only, not the docstrings that mention it
        if (isinstance(node, ast.Attribute) and node.attr == "int" and isinstance(node.value, ast.Name)
                and node.value.id in ("np", "numpy")):
            return f"{path}:{node.lineno}"
    return None
