"""What every front end shares: the backend's name as nodes store it, and a SpikingJelly node seen
through the model registry (its model, its options, its state, whether the kernels can run it).
Nothing here knows an API; each front end (``activation_based``, ``clock_driven``) hooks its own
classes and calls ``functional.neuron_multi_step``."""
from __future__ import annotations

from typing import Optional

from .. import surrogate as surrogate_specs
from ..neurons import model_of
from ..ops import state_dtype

BACKEND = "temporal_fusion"
BACKENDS = (BACKEND, "torch", "cupy")  # what sj_temporal_fusion.set_backend switches between
DYNAMICS = ("neuronal_charge", "neuronal_fire", "neuronal_reset", "neuronal_adaptation")


class _BackendName(str):
    """'temporal_fusion' as a node stores it: equal to the string, pickled as this package's."""

    def __reduce__(self):
        return (_backend_name, ())


def _backend_name() -> str:
    return BACKEND_NAME  # unpickling imported sj_temporal_fusion, which registered the backend


BACKEND_NAME = _BackendName(BACKEND)


def served_class(node, classes: tuple) -> Optional[type]:
    """The most specific class of ``classes`` that ``node`` is an instance of, or None."""
    return next((cls for cls in type(node).__mro__ if cls in classes), None)


def own_dynamics(node, served: type, dynamics: tuple = DYNAMICS) -> list[str]:
    """The ``dynamics`` methods (the API's names for them) a subclass of ``served`` overrides: the
    kernels run the stock ones only."""
    return [name for name in dynamics if getattr(type(node), name, None) is not getattr(served, name, None)]


def class_problem(node, classes: tuple, dynamics: tuple = DYNAMICS) -> Optional[str]:
    """Why no model of ``classes`` runs ``node``: its class is none of them nor a subclass, or a
    subclass overriding ``dynamics``; None when one does."""
    name = type(node).__name__
    served = served_class(node, classes)
    if served is None:
        return (f"no temporal_fusion model serves {name} (served: {', '.join(c.__name__ for c in classes)} "
                f"and subclasses that keep their dynamics)")
    changed = own_dynamics(node, served, dynamics)
    if changed:
        return (f"{name} subclasses {served.__name__} with its own {', '.join(changed)}: the kernels run "
                f"{served.__name__}'s dynamics only")
    return None


def node_options(node) -> dict:
    """The keyword options of ``neuron_multi_step`` that reproduce ``node`` (model included)."""
    model = model_of(node)
    return dict(model.node_options(node), model=model.name, surrogate_function=node.surrogate_function)


def options_problem(node) -> Optional[str]:
    """Why the kernels cannot take this node's current options or surrogate (a per-channel
    threshold, a custom surrogate ...), or None."""
    options = node_options(node)
    try:
        model_of(node).validate(dict(model_of(node).defaults, **{k: v for k, v in options.items()
                                                                 if k not in ("model", "surrogate_function")}))
        surrogate_specs.spec(options["surrogate_function"])
    except (ValueError, TypeError, NotImplementedError) as exc:
        return str(exc)
    return None


def node_state(node, x_step) -> tuple:
    """The node's state as the kernels take it: tensors in the state dtype (a float state, as after
    reset_net, becomes a full tensor of that value)."""
    acc = state_dtype(x_step.dtype)
    states = []
    for name in model_of(node).states:
        value = getattr(node, name)
        states.append(x_step.new_full(x_step.shape, value, dtype=acc) if isinstance(value, float) else value)
    return tuple(states)


def set_state(node, final) -> None:
    for name, value in zip(model_of(node).states, final):
        setattr(node, name, value)
