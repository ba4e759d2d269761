"""One front end per SpikingJelly API, each mapping its neuron classes onto the model registry and
``functional.neuron_multi_step`` and owning nothing else: ``activation_based`` and
``clock_driven`` (SpikingJelly 0.0.0.0.14), ``spikingjelly2`` (SpikingJelly 2.x). Only the
installed generation's front ends are loaded (``sj_temporal_fusion.versions`` decides).
``register`` / ``unregister`` act on all of them;
``set_backend(net, backend)`` switches every neuron of a model whichever API it comes from, and
says which did not switch and why."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .. import versions
from .common import BACKEND

if versions.GENERATION == 1:
    # These import SpikingJelly 0.0.0.0.14's backend machinery and clock_driven, gone in 2.x.
    from . import activation_based, clock_driven
    from .common import BACKENDS
    FRONTENDS = (activation_based, clock_driven)
else:
    from . import spikingjelly2
    from .spikingjelly2 import BACKENDS
    FRONTENDS = (spikingjelly2,)
log = logging.getLogger("sj_temporal_fusion")


def register() -> None:
    """Offer 'temporal_fusion' on every class a registered model serves, in every API (idempotent)."""
    for frontend in FRONTENDS:
        frontend.register()


def unregister() -> None:
    """Stop offering 'temporal_fusion' in every API (idempotent); a node still set to it raises an
    error naming the fix, in every step mode, training or eval."""
    for frontend in FRONTENDS:
        frontend.unregister()


def registered() -> bool:
    return all(frontend.registered() for frontend in FRONTENDS)


@dataclass
class Switched:
    """What ``set_backend`` did: module name (as ``net.named_modules()`` gives it; '' is ``net``)
    -> class name for the nodes now on ``backend``, and -> the reason for those left as they were."""
    backend: str
    switched: dict = field(default_factory=dict)
    not_switched: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"set_backend {self.backend!r}: {len(self.switched)} switched, {len(self.not_switched)} not"]
        lines += [f"  not switched: {name or '(net)'}: {reason}" for name, reason in self.not_switched.items()]
        return "\n".join(lines)


def set_backend(net, backend: str) -> Switched:
    """Set every SpikingJelly neuron in ``net`` (activation_based and clock_driven nodes alike) that
    can run ``backend`` ('temporal_fusion', 'torch' or 'cupy'; under SpikingJelly 2.x, which has no
    backends, 'temporal_fusion' or 'spikingjelly', its own path) to it, leaving the others as they
    are. Returns (and logs at INFO on the 'sj_temporal_fusion' logger) which nodes switched and,
    for each that did not, why: a class no model serves, a subclass with its own dynamics, a
    single-step clock_driven node (no backend there), a per-channel threshold, a custom surrogate."""
    if backend not in BACKENDS:
        other = ("for another backend use SpikingJelly's own functional.set_backend" if versions.GENERATION == 1
                 else f"SpikingJelly {versions.VERSION} has no backends: '{BACKEND}' switches a node to the "
                      f"fused kernels, 'spikingjelly' back to SpikingJelly's own path")
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}; {other}")
    result = Switched(backend)
    for name, module in net.named_modules():
        frontend = next((f for f in FRONTENDS if f.owns(module)), None)
        if frontend is None:
            continue
        reason = frontend.why_not(module, backend)
        if reason is None:
            frontend.switch(module, backend)
            result.switched[name] = type(module).__name__
        else:
            current = getattr(module, "backend", None)
            result.not_switched[name] = reason + (f" (it stays on {current!r})" if current is not None else "")
    log.info("%s", result)
    return result


__all__ = ["BACKEND", "BACKENDS", "FRONTENDS", "Switched", "register", "registered", "set_backend", "unregister"]
