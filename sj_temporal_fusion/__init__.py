"""sj-temporal-fusion: fused multi-time-step neuron kernels as a SpikingJelly backend.

``import sj_temporal_fusion`` registers backend ``'temporal_fusion'`` on every SpikingJelly neuron
class a model in ``sj_temporal_fusion.neurons.REGISTRY`` serves, in both APIs of SpikingJelly
0.0.0.0.14: activation_based (IFNode, LIFNode, ParametricLIFNode, QIFNode, EIFNode,
IzhikevichNode, KLIFNode) and clock_driven (MultiStepIFNode, MultiStepLIFNode,
MultiStepParametricLIFNode, MultiStepEIFNode); ``unregister()`` and ``register()`` switch it off
and on again. ``set_backend(net, backend)`` switches a whole model whichever API its nodes use.
Under SpikingJelly 2.x (no backends, no clock_driven) nothing changes at import: its IFNode ...
KLIFNode switch with ``set_backend(net, 'temporal_fusion')`` and back with
``set_backend(net, 'spikingjelly')``. Any other SpikingJelly version is an ImportError naming the
supported ones (``versions``).
"""
from . import versions  # first: an unsupported SpikingJelly fails here, with the supported versions named
from . import ops
from .frontends import BACKEND, Switched, register, registered, set_backend, unregister
from .functional import lif_multi_step, neuron_multi_step
from .optimize import optimize

__version__ = "0.1.0"
__all__ = ["BACKEND", "Switched", "lif_multi_step", "neuron_multi_step", "ops", "optimize", "register",
           "registered", "set_backend", "unregister"]

register()
