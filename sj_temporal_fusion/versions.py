"""Which SpikingJelly generation is installed: the one place that decides which front ends load.

Two generations are served, each by its own front ends (``frontends/``):
- ``0.0.0.0.14``: ``activation_based`` (with backends) and ``clock_driven``;
- ``2.x``: ``activation_based`` without backends (``frontends/spikingjelly2.py``).
Anything else raises one ``ImportError`` at ``import sj_temporal_fusion`` naming both, instead of
an AttributeError deep inside a front end.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import types

SUPPORTED = "spikingjelly 0.0.0.0.14 or spikingjelly>=2.0,<3"
LEGACY = "0.0.0.0.14"


class UnsupportedSpikingJelly(ImportError):
    """The installed SpikingJelly is neither 0.0.0.0.14 nor 2.x."""


def _installed_version() -> str:
    if importlib.util.find_spec("spikingjelly") is None:
        raise UnsupportedSpikingJelly(
            f"sj_temporal_fusion needs SpikingJelly and none is installed: pip install 'spikingjelly>=2.0,<3' "
            f"(or spikingjelly==0.0.0.0.14); supported: {SUPPORTED}")
    try:
        return importlib.metadata.version("spikingjelly")
    except importlib.metadata.PackageNotFoundError:
        # A source tree on sys.path without metadata: its layout tells the generation apart
        # (2.x removed clock_driven and the backends).
        return LEGACY if importlib.util.find_spec("spikingjelly.clock_driven") else "2 (source tree)"


def _generation(version: str) -> int:
    if version == LEGACY:
        return 1
    major = version.split(".", 1)[0].split(" ", 1)[0]
    if major == "2":
        return 2
    raise UnsupportedSpikingJelly(
        f"sj_temporal_fusion does not support the installed spikingjelly {version}: supported are {SUPPORTED}. "
        f"Install one of them, e.g. pip install 'spikingjelly>=2.0,<3'")


VERSION = _installed_version()
GENERATION = _generation(VERSION)  # 1: 0.0.0.0.14, 2: 2.x


class _Absent(type):
    def __instancecheck__(cls, obj):
        return False

    def __subclasscheck__(cls, sub):
        return False


class _AbsentModule(types.ModuleType):
    """Stands in for a ``spikingjelly.clock_driven`` module under SpikingJelly 2.x: each class read
    from it is a placeholder that no object is an instance of, so tables built from that API at
    import time stay valid and match nothing."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = _Absent(f"{name} (absent: {self.__name__} needs SpikingJelly {LEGACY})", (), {})
        setattr(self, name, placeholder)
        return placeholder


def clock_driven(submodule: str):
    """``spikingjelly.clock_driven.<submodule>`` under 0.0.0.0.14; under 2.x, which removed that
    API, a stand-in whose classes match no object."""
    name = f"spikingjelly.clock_driven.{submodule}"
    if GENERATION == 1:
        return importlib.import_module(name)
    return _AbsentModule(name)
