"""The neuron models the kernels know: one CUDA C header (csrc/neurons/<name>.cuh), one Python file
(neurons/<name>.py) and one line here each. Tests, the NVRTC variant lists and the front ends
(one per SpikingJelly API: ``frontends/``) iterate over REGISTRY. SpikingJelly 0.0.0.0.14's LIAFNode is not here: its
__init__ raises AttributeError, so no LIAFNode can be built."""
from . import eif, izhikevich, klif, lif, qif
from .base import NeuronModel

REGISTRY: dict[str, NeuronModel] = {m.name: m for m in (
    lif.MODEL,
    qif.MODEL,
    eif.MODEL,
    izhikevich.MODEL,
    klif.MODEL,
)}


def model_of(node) -> NeuronModel:
    """The model serving SpikingJelly node ``node``, of either API (the most specific class wins)."""
    for cls in type(node).__mro__:
        for model in REGISTRY.values():
            if cls in model.classes or cls in model.clock_driven:
                return model
    raise KeyError(f"no temporal_fusion model serves {type(node).__name__}")
