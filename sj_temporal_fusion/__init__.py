"""sj-temporal-fusion: fused multi-time-step LIF kernels as a SpikingJelly backend.

``import sj_temporal_fusion`` registers backend ``'temporal_fusion'`` on SpikingJelly's IFNode,
LIFNode and ParametricLIFNode (idempotent); ``unregister()`` removes it.
"""
from . import ops
from .functional import lif_multi_step
from .optimize import optimize
from .spikingjelly import BACKEND, register, unregister

__version__ = "0.1.0"
__all__ = ["BACKEND", "lif_multi_step", "ops", "optimize", "register", "unregister"]

register()
