"""sj-temporal-fusion: fused multi-time-step neuron kernels as a SpikingJelly backend.

``import sj_temporal_fusion`` registers backend ``'temporal_fusion'`` on every SpikingJelly neuron
class a model in ``sj_temporal_fusion.neurons.REGISTRY`` serves (IFNode, LIFNode,
ParametricLIFNode, QIFNode, EIFNode, IzhikevichNode, KLIFNode); ``unregister()`` and
``register()`` switch it off and on again.
"""
from . import ops
from .functional import lif_multi_step, neuron_multi_step
from .optimize import optimize
from .spikingjelly import BACKEND, register, registered, unregister

__version__ = "0.1.0"
__all__ = ["BACKEND", "lif_multi_step", "neuron_multi_step", "ops", "optimize", "register", "registered",
           "unregister"]

register()
