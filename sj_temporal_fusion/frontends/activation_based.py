"""Front end for SpikingJelly 0.0.0.0.14's ``spikingjelly.activation_based.neuron``: backend
'temporal_fusion' registered on every class a model in ``neurons.REGISTRY`` serves, in step modes
'm' and 's'. Each class keeps its own code for its other backends; ours is added beside it.

``register()`` (run by ``import sj_temporal_fusion``) and ``unregister()`` are each other's
inverse and may be called any number of times. After ``unregister()`` the backend is no longer
offered, and a node still set to it raises a RuntimeError that says so instead of silently running
another backend. A node set to the backend pickles its backend as a reference to this package, so
a whole saved model loads in a fresh process: unpickling imports sj_temporal_fusion, which registers.
"""
from __future__ import annotations

from typing import Optional

from spikingjelly.activation_based import base

from ..functional import check_input, neuron_multi_step
from ..neurons import REGISTRY
from .common import (BACKEND, BACKEND_NAME, _backend_name, class_problem, node_options, node_state,  # noqa: F401
                     options_problem, own_dynamics, served_class, set_state)

NAME = "activation_based"
_PATCHED = ("supported_backends", "multi_step_forward", "single_step_forward", "backend")
_saved: dict = {}  # class -> {attribute: the class's own attribute, or None if inherited}
_registered = False


def node_classes() -> tuple:
    return tuple(cls for model in REGISTRY.values() for cls in model.classes)


NODES = node_classes()  # every SpikingJelly class the backend serves


def fusable(node) -> bool:
    """True unless a subclass changed the dynamics: the kernels implement the stock ones only."""
    return not own_dynamics(node, served_class(node, NODES))


def fused_multi_step(node, x_seq, fold_bn=None):
    """The node's multi-step forward in one kernel; ``fold_bn``: a BatchNorm folded into the read
    of x_seq (``functional.neuron_multi_step``), as ``optimize(net, fold_bn=True)`` passes it."""
    check_input(x_seq, (), ())  # before SpikingJelly's x_seq[0], which fails on (0, N) or 0-dim input
    options = node_options(node)
    spike_seq, final, v_seq = neuron_multi_step(x_seq, node_state(node, x_seq[0]), store_v_seq=node.store_v_seq,
                                                fold_bn=fold_bn, **options)
    set_state(node, final)
    if node.store_v_seq:
        node.v_seq = v_seq
    return spike_seq


def fused_single_step(node, x, fold_bn=None):
    if not hasattr(x, "unsqueeze"):
        raise TypeError(f"the input of a 'temporal_fusion' node must be a torch.Tensor, got {type(x).__name__}")
    spike_seq, final, _ = neuron_multi_step(x.unsqueeze(0), node_state(node, x), fold_bn=fold_bn,
                                            **node_options(node))
    set_state(node, final)
    return spike_seq[0]


def fused_forward(node, x, fold_bn=None):
    """The node's forward in its step mode, as ``optimize(net, fold_bn=...)`` runs a folded pair."""
    return (fused_multi_step if node.step_mode == "m" else fused_single_step)(node, x, fold_bn)


def _unregistered(node):
    raise RuntimeError(
        f"{type(node).__name__} is set to backend '{BACKEND}', which sj_temporal_fusion.unregister() "
        f"removed: call sj_temporal_fusion.register() again, or switch the network with "
        f"spikingjelly.activation_based.functional.set_backend(net, 'torch')")


def _wrap(cls, name, registered: bool):
    original = getattr(cls, name)
    if name == "supported_backends":
        def supported_backends(self):
            found = original.fget(self)
            return tuple(found) + (BACKEND,) if registered and fusable(self) else found
        return property(supported_backends)
    if name == "backend":
        def set_backend(self, value):
            original.fset(self, value)
            if value == BACKEND:
                self._backend = BACKEND_NAME
        return property(original.fget, set_backend)
    fused = fused_multi_step if name == "multi_step_forward" else fused_single_step

    def step_forward(self, x):
        if self.backend != BACKEND:
            return original(self, x)
        return fused(self, x) if registered else _unregistered(self)
    step_forward.__name__ = name
    step_forward.__doc__ = original.__doc__
    return step_forward


def _check_backend_library(backend: str):
    # SpikingJelly's setter rejects backends it does not know; ours needs CuPy only for CUDA
    # tensors, and says so when one arrives.
    if backend != BACKEND:
        _saved[base]["check_backend_library"](backend)


def _install(registered: bool) -> None:
    for cls in node_classes():
        if cls not in _saved:
            _saved[cls] = {name: cls.__dict__.get(name) for name in _PATCHED}
        for name in _PATCHED:
            own = _saved[cls][name]
            if own is None and name in cls.__dict__:
                delattr(cls, name)  # our earlier wrapper: wrap what the class inherits again
            elif own is not None:
                setattr(cls, name, own)
        for name in _PATCHED:
            setattr(cls, name, _wrap(cls, name, registered))


def register() -> None:
    """Offer 'temporal_fusion' on every class a registered model serves (idempotent)."""
    global _registered
    if base not in _saved:
        _saved[base] = {"check_backend_library": base.check_backend_library}
        base.check_backend_library = _check_backend_library
    _install(True)
    _registered = True


def unregister() -> None:
    """Stop offering 'temporal_fusion' (idempotent). SpikingJelly's own code runs every other
    backend; a node still set to this one raises a RuntimeError naming the fix."""
    global _registered
    if not _registered:
        return
    _install(False)
    _registered = False


def registered() -> bool:
    return _registered


# ------------------------------------------------------------ sj_temporal_fusion.set_backend

def owns(module) -> bool:
    """A module of this API that has a backend (SpikingJelly's own set_backend rule)."""
    return isinstance(module, base.MemoryModule) and hasattr(type(module), "backend")


def why_not(module, backend: str) -> Optional[str]:
    """Why ``module`` cannot run ``backend`` (None: it can)."""
    name = type(module).__name__
    if backend == BACKEND:
        problem = class_problem(module, NODES) or options_problem(module)
        if problem:
            return problem
    if backend not in module.supported_backends:
        return (f"{name} in step mode {module.step_mode!r} supports the backends "
                f"{tuple(module.supported_backends)}, not {backend!r}")
    return None


def switch(module, backend: str) -> None:
    module.backend = backend
