"""Front end for SpikingJelly 0.0.0.0.14's older API, ``spikingjelly.clock_driven.neuron``: backend
'temporal_fusion' on the multi-step classes a model in ``neurons.REGISTRY`` serves
(MultiStepIFNode, MultiStepLIFNode, MultiStepParametricLIFNode, MultiStepEIFNode) and their
subclasses that keep the dynamics, given to the constructor or assigned on a built node
(``node.backend = 'temporal_fusion'``).

SpikingJelly's hooks, each wrapped so that every other backend runs its own code unchanged:
- ``clock_driven.neuron.check_backend``, which each constructor calls and which raises
  NotImplementedError for a backend it does not know, lets ours through;
- ``forward`` of each served class runs the fused kernel when the node is set to ours, with those
  classes' contract: ``v_seq`` (T, *) always kept (differentiable), ``v`` its last step (kept in
  the state dtype, fp32 for fp16/bf16 inputs), ``clock_driven.functional.reset_net`` resets both;
- ``backend``, a plain instance attribute there, becomes a property over that same attribute:
  it stores ours as a name that pickles as this package's (a pickled model loads in a fresh
  process) and refuses ours on a subclass with its own dynamics.
``register()`` / ``unregister()`` are each other's inverse, as the activation_based front end's.
"""
from __future__ import annotations

from typing import Optional

from spikingjelly.clock_driven import neuron as cd_neuron

from ..functional import neuron_multi_step
from ..neurons import REGISTRY
from .common import (BACKEND, BACKEND_NAME, class_problem, node_options, node_state, options_problem,
                     own_dynamics, served_class, set_state)

NAME = "clock_driven"
NODES = tuple(cls for model in REGISTRY.values() for cls in model.clock_driven)
_saved: dict = {}  # class (or the neuron module) -> {attribute: SpikingJelly's own}
_registered = False


def fusable(node) -> bool:
    """True unless a subclass changed the dynamics: the kernels implement the stock ones only."""
    served = served_class(node, NODES)
    return served is not None and not own_dynamics(node, served)


def fused_forward(node, x_seq, fold_bn=None):
    """The node's forward over x_seq (T, N, *) in one kernel; v_seq and v kept as SpikingJelly's
    multi-step classes keep them. ``fold_bn``: a BatchNorm folded into the read of x_seq
    (``functional.neuron_multi_step``), as ``optimize(net, fold_bn=...)`` passes it."""
    if not hasattr(x_seq, "dim") or x_seq.dim() < 2:
        raise ValueError(
            f"{type(node).__name__} takes x_seq of shape (T, N, *), got "
            f"{tuple(x_seq.shape) if hasattr(x_seq, 'shape') else type(x_seq).__name__}: the first dimension "
            f"is time")
    spike_seq, final, v_seq = neuron_multi_step(x_seq, node_state(node, x_seq[0]), store_v_seq=True,
                                                fold_bn=fold_bn, **node_options(node))
    set_state(node, final)
    node.v_seq = v_seq
    return spike_seq


def _refuse(node, reason: str):
    raise RuntimeError(f"{type(node).__name__} is set to backend '{BACKEND}', {reason}: call "
                       f"sj_temporal_fusion.register() again, or set node.backend = 'torch'")


def _check_backend(backend: str):
    if backend == BACKEND:
        if not _registered:
            raise NotImplementedError(
                f"backend '{BACKEND}' was removed by sj_temporal_fusion.unregister(): call "
                f"sj_temporal_fusion.register() again, or use backend='torch'")
        return
    _saved[cd_neuron]["check_backend"](backend)


def _backend_property():
    def get_backend(self):
        try:
            return self.__dict__["backend"]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no attribute 'backend'") from None

    def set_backend(self, value):
        if value == BACKEND:
            if not _registered:
                _refuse(self, "which sj_temporal_fusion.unregister() removed")
            changed = own_dynamics(self, served_class(self, NODES))
            if changed:
                raise ValueError(
                    f"{type(self).__name__} overrides {', '.join(changed)}: backend '{BACKEND}' runs "
                    f"{served_class(self, NODES).__name__}'s dynamics only; use backend='torch'")
            value = BACKEND_NAME
        self.__dict__["backend"] = value

    return property(get_backend, set_backend, doc="the node's backend (a plain attribute in SpikingJelly)")


def _forward(cls):
    original = _saved[cls]["forward"]

    def forward(self, x_seq):
        if self.backend != BACKEND:
            return original(self, x_seq)
        if not _registered:
            _refuse(self, "which sj_temporal_fusion.unregister() removed")
        return fused_forward(self, x_seq)
    forward.__name__ = "forward"
    forward.__doc__ = original.__doc__
    return forward


def register() -> None:
    """Offer 'temporal_fusion' on every served clock_driven class (idempotent)."""
    global _registered
    if cd_neuron not in _saved:
        _saved[cd_neuron] = {"check_backend": cd_neuron.check_backend}
        cd_neuron.check_backend = _check_backend
    for cls in NODES:
        if cls not in _saved:
            _saved[cls] = {"forward": cls.__dict__["forward"]}
            cls.forward = _forward(cls)
            cls.backend = _backend_property()
    _registered = True


def unregister() -> None:
    """Stop offering 'temporal_fusion' (idempotent): constructors reject it again, and a node still
    set to it raises an error naming the fix; every other backend runs SpikingJelly's code."""
    global _registered
    _registered = False


def registered() -> bool:
    return _registered


# ------------------------------------------------------------ sj_temporal_fusion.set_backend

def owns(module) -> bool:
    """Every neuron of this API: multi-step nodes carry a backend, single-step ones have none."""
    return isinstance(module, cd_neuron.BaseNode)


def why_not(module, backend: str) -> Optional[str]:
    """Why ``module`` cannot run ``backend`` (None: it can)."""
    name = type(module).__name__
    if "backend" not in vars(module):
        reason = (f"{name} is a single-step clock_driven node, which has no backend (SpikingJelly runs it in "
                  f"Python step by step)")
        if isinstance(module, cd_neuron.LIAFNode):
            return reason + "; LIAFNode outputs act(v), not spikes, which the kernels do not compute"
        return reason + f"; its multi-step counterpart MultiStep{name} takes a backend" if hasattr(
            cd_neuron, f"MultiStep{name}") else reason
    if backend == BACKEND:
        return class_problem(module, NODES) or options_problem(module)
    if backend == "cupy" and cd_neuron.cupy is None:
        return f"SpikingJelly's clock_driven cupy backend is unavailable here: {_cupy_import_error()}"
    return None


def _cupy_import_error() -> str:
    """Why clock_driven.neuron found no CuPy: it imports CuPy and its kernel modules together, and
    reports any failure as "CuPy is not installed" (cu_kernel_opt also needs tensorboard)."""
    try:
        import cupy  # noqa: F401
        import spikingjelly.clock_driven.neuron_kernel  # noqa: F401
    except Exception as exc:  # the import error is the message
        return f"{type(exc).__name__}: {exc}"
    return "its import failed when spikingjelly.clock_driven.neuron was first imported"


def switch(module, backend: str) -> None:
    module.backend = backend
