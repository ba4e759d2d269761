"""Registration of backend 'temporal_fusion' on SpikingJelly 0.0.0.0.14's IFNode, LIFNode and
ParametricLIFNode, in step modes 'm' and 's'. Each class keeps its own code for its other
backends; ours is added beside them and removed again by ``unregister()``."""
from __future__ import annotations

from spikingjelly.activation_based import base, neuron

from .functional import lif_multi_step

BACKEND = "temporal_fusion"
NODES = (neuron.IFNode, neuron.LIFNode, neuron.ParametricLIFNode)
_PATCHED = ("supported_backends", "multi_step_forward", "single_step_forward")
_DYNAMICS = ("neuronal_charge", "neuronal_fire", "neuronal_reset")
_saved: dict = {}  # class -> {attribute: the class's own attribute, or None if inherited}


def _node_class(node):
    return next(cls for cls in NODES if isinstance(node, cls))


def fusable(node) -> bool:
    """True unless a subclass changed the dynamics: the kernels implement the stock ones only."""
    cls = _node_class(node)
    return all(getattr(type(node), name) is getattr(cls, name) for name in _DYNAMICS)


def node_options(node) -> dict:
    """The keyword arguments of ``lif_multi_step`` that reproduce ``node``."""
    options = dict(v_threshold=node.v_threshold, v_reset=node.v_reset, detach_reset=node.detach_reset,
                   surrogate_function=node.surrogate_function)
    if isinstance(node, neuron.LIFNode):
        options.update(kind="lif", tau=node.tau, decay_input=node.decay_input)
    elif isinstance(node, neuron.ParametricLIFNode):
        options.update(kind="plif", w=node.w, decay_input=node.decay_input)
    else:
        options.update(kind="if")
    return options


def fused_multi_step(node, x_seq):
    node.v_float_to_tensor(x_seq[0])
    spike_seq, node.v, v_seq = lif_multi_step(x_seq, node.v, store_v_seq=node.store_v_seq,
                                              **node_options(node))
    if node.store_v_seq:
        node.v_seq = v_seq
    return spike_seq


def fused_single_step(node, x):
    node.v_float_to_tensor(x)
    spike_seq, node.v, _ = lif_multi_step(x.unsqueeze(0), node.v, **node_options(node))
    return spike_seq[0]


def _wrap(cls, name):
    original = getattr(cls, name)
    if name == "supported_backends":
        def supported_backends(self):
            found = original.fget(self)
            return tuple(found) + (BACKEND,) if fusable(self) else found
        return property(supported_backends)
    fused = fused_multi_step if name == "multi_step_forward" else fused_single_step

    def step_forward(self, x):
        return fused(self, x) if self.backend == BACKEND else original(self, x)
    step_forward.__name__ = name
    step_forward.__doc__ = original.__doc__
    return step_forward


def _check_backend_library(backend: str):
    # SpikingJelly's setter rejects backends it does not know; ours needs CuPy only for CUDA
    # tensors, and says so when one arrives.
    if backend != BACKEND:
        _saved[base]["check_backend_library"](backend)


def register() -> None:
    """Add 'temporal_fusion' to the supported backends of the three nodes (idempotent)."""
    if base not in _saved:
        _saved[base] = {"check_backend_library": base.check_backend_library}
        base.check_backend_library = _check_backend_library
    for cls in NODES:
        if cls in _saved:
            continue
        _saved[cls] = {name: cls.__dict__.get(name) for name in _PATCHED}
        for name in _PATCHED:
            setattr(cls, name, _wrap(cls, name))


def unregister() -> None:
    """Restore the nodes as SpikingJelly defines them."""
    for cls, attributes in _saved.items():
        for name, original in attributes.items():
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)
    _saved.clear()
