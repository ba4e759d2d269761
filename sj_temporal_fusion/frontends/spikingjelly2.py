"""Front end for SpikingJelly 2.x's ``spikingjelly.activation_based.neuron``: its IFNode, LIFNode,
ParametricLIFNode, QIFNode, EIFNode, IzhikevichNode and KLIFNode (and subclasses that keep their
dynamics) on ``functional.neuron_multi_step``, in step modes 'm' and 's'.

SpikingJelly 2 has no backends: each node runs its own ``functional.<neuron>_multi_step``. Nothing
changes until ``sj_temporal_fusion.set_backend(net, 'temporal_fusion')``, which marks each node it
switches with an instance attribute ``backend = 'temporal_fusion'`` (the first switch also wraps
the served classes' ``single_step_forward`` / ``multi_step_forward`` so that a marked node runs
the kernels; an unmarked node runs SpikingJelly 2's own method, unchanged).
``set_backend(net, 'spikingjelly')`` removes the mark: the node is back on SpikingJelly 2's own path.

The node's contract is SpikingJelly 2's: its memories (v, Izhikevich's w) carried across calls
until ``functional.reset_net``, a stored state of another shape restarting from the reset value
(its ``materialize_states``), ``functional.detach_net``, ``store_v_seq`` (in step mode 's' the
voltage of each step appended to ``v_seq`` until ``reset()``), learnable PLIF ``w`` and KLIF ``k``.
The state is kept in the kernels' precision (fp32 for fp16/bf16 inputs) where SpikingJelly 2
keeps it in the input's dtype; the README lists where its formulas differ from 0.0.0.0.14's.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from spikingjelly.activation_based import neuron

from ..functional import check_input, neuron_multi_step
from ..neurons import REGISTRY, model_of
from ..ops import state_dtype
from .common import BACKEND, class_problem, node_options, options_problem, own_dynamics, served_class

NAME = "spikingjelly2"
RESTORE = "spikingjelly"  # set_backend(net, RESTORE): SpikingJelly 2's own path again
BACKENDS = (BACKEND, RESTORE)
# What a subclass must not override for the kernels to run its dynamics: SpikingJelly 2 puts a
# node's dynamics in its functional forwards and how it loads its state in materialize_states.
DYNAMICS = ("single_step_functional_forward", "multi_step_functional_forward", "materialize_states",
            "single_step_forward", "multi_step_forward", "forward")
# SpikingJelly 2 surrogates whose derivative differs from their 0.0.0.0.14 namesake's (the
# kernel's): refused by name rather than run with the other formula.
DIFFERENT_SURROGATES = {
    "PiecewiseLeakyReLU": "SpikingJelly 2's PiecewiseLeakyReLU has slope 1/(2w) inside |x| < w where "
                          "0.0.0.0.14's (the kernel's) has 1/w",
}
_STEP_METHODS = ("multi_step_forward", "single_step_forward")
_wrapped: set = set()   # classes whose step methods carry our wrapper
_registered = False


def node_classes() -> tuple:
    return tuple(cls for model in REGISTRY.values() for cls in model.classes)


NODES = node_classes()


class _BackendMark(str):
    """'temporal_fusion' as a switched node stores it: unpickling imports this package and wraps
    the served classes again, so a saved switched model runs the kernels in a fresh process."""

    def __reduce__(self):
        return (_backend_mark, ())


def _backend_mark() -> str:
    _install()
    return BACKEND_MARK


BACKEND_MARK = _BackendMark(BACKEND)


def is_switched(node) -> bool:
    return vars(node).get("backend") == BACKEND


def fusable(node) -> bool:
    served = served_class(node, NODES)
    return served is not None and not own_dynamics(node, served, DYNAMICS)


def surrogate_problem(surrogate_function) -> Optional[str]:
    name = type(surrogate_function).__name__
    if type(surrogate_function).__module__.startswith("spikingjelly.") and name in DIFFERENT_SURROGATES:
        return (f"{DIFFERENT_SURROGATES[name]}: backend '{BACKEND}' does not run it; use another surrogate "
                f"or keep this node on SpikingJelly's own path")
    return None


def dynamics_problem(node) -> Optional[str]:
    """Options under which SpikingJelly 2's dynamics differ from the kernels' (0.0.0.0.14's), or None."""
    if (isinstance(node, neuron.IzhikevichNode) and node.detach_reset and node.v_reset is not None
            and float(node.v_reset) != 0.0):
        # 0.0.0.0.14 resets to (1 - s.detach()) h + s v_reset, SpikingJelly 2 to (1 - s.detach()) h +
        # s.detach() v_reset: the gradients through the spike differ by v_reset times the surrogate.
        return ("SpikingJelly 2's IzhikevichNode with detach_reset=True detaches the spike in the hard reset's "
                "v_reset term too, which the kernels do not: with v_reset != 0 it stays on SpikingJelly's own path")
    return None


def _state(node, x) -> tuple:
    """SpikingJelly 2's materialize_states for the kernels: a float memory (as after reset_net)
    becomes a full tensor, a tensor of another shape restarts from the reset value, and the
    state is kept in the kernels' precision."""
    acc = state_dtype(x.dtype)
    restart = {"v": 0.0 if node.v_reset is None else node.v_reset, "w": getattr(node, "w_rest", 0.0)}
    states = []
    for name in model_of(node).states:
        value = getattr(node, name)
        if isinstance(value, torch.Tensor) and value.shape == x.shape:
            states.append(value.to(device=x.device, dtype=acc))
        else:
            fill = value if isinstance(value, (int, float)) else restart[name]
            states.append(torch.full(x.shape, float(fill), dtype=acc, device=x.device))
    return tuple(states)


def _set_state(node, final) -> None:
    for name, value in zip(model_of(node).states, final):
        # detach_net detaches memories in place, which a view (a slice of v_seq) does not allow.
        setattr(node, name, value if value._base is None else value.clone())


def _options(node) -> dict:
    problem = surrogate_problem(node.surrogate_function) or dynamics_problem(node)
    if problem:
        raise NotImplementedError(f"{type(node).__name__}: {problem}")
    return node_options(node)


def fused_multi_step(node, x_seq, fold_bn=None):
    """The node's multi-step forward, (T, N, *) -> spikes (T, N, *), in one kernel launch."""
    check_input(x_seq, (), ())
    spike_seq, final, v_seq = neuron_multi_step(x_seq, _state(node, x_seq[0]), store_v_seq=node.store_v_seq,
                                                fold_bn=fold_bn, **_options(node))
    _set_state(node, final)
    if node.store_v_seq:
        node.v_seq = v_seq
    return spike_seq


def fused_single_step(node, x, fold_bn=None):
    """One step, (N, *) -> spikes (N, *): the same kernel with T = 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"the input of a '{BACKEND}' node must be a torch.Tensor, got {type(x).__name__}")
    spike_seq, final, _ = neuron_multi_step(x.unsqueeze(0), _state(node, x), fold_bn=fold_bn, **_options(node))
    _set_state(node, final)
    if node.store_v_seq:
        node._append_v_seq(node.v)  # SpikingJelly 2's BaseNode.single_step_forward does the same
    return spike_seq[0]


def fused_forward(node, x, fold_bn=None):
    """The node's forward in its step mode, as ``optimize(net, fold_bn=...)`` runs a folded pair."""
    return (fused_multi_step if node.step_mode == "m" else fused_single_step)(node, x, fold_bn)


def _unregistered(node):
    raise RuntimeError(
        f"{type(node).__name__} is switched to '{BACKEND}', which sj_temporal_fusion.unregister() removed: "
        f"call sj_temporal_fusion.register() again, or sj_temporal_fusion.set_backend(net, '{RESTORE}')")


def _wrap(original, fused):
    @functools.wraps(original)
    def step_forward(self, x, *args, **kwargs):
        if not is_switched(self):
            return original(self, x, *args, **kwargs)
        if not _registered:
            _unregistered(self)
        if args or kwargs:
            raise TypeError(f"a '{BACKEND}' {type(self).__name__} takes one input tensor, got extra "
                            f"arguments {args} {kwargs}: set_backend(net, '{RESTORE}') for this node")
        return fused(self, x)
    step_forward._sj_temporal_fusion_original = original
    return step_forward


def _install() -> None:
    """Wrap the served classes' step methods (once): unmarked nodes still run the original."""
    for cls in NODES:
        if cls in _wrapped:
            continue
        for name, fused in zip(_STEP_METHODS, (fused_multi_step, fused_single_step)):
            setattr(cls, name, _wrap(getattr(cls, name), fused))
        _wrapped.add(cls)


def register() -> None:
    """Offer 'temporal_fusion' to set_backend (idempotent). Changes no class and no node: the
    first set_backend(net, 'temporal_fusion') does."""
    global _registered
    _registered = True


def unregister() -> None:
    """Stop offering 'temporal_fusion' (idempotent); a node still switched to it raises an error
    naming the fix, instead of silently running another path."""
    global _registered
    _registered = False


def registered() -> bool:
    return _registered


# ------------------------------------------------------------ sj_temporal_fusion.set_backend

def owns(module) -> bool:
    """A SpikingJelly 2 spiking neuron (whether or not a model serves it)."""
    return isinstance(module, (neuron.BaseNode, neuron.SimpleBaseNode))


def why_not(module, backend: str) -> Optional[str]:
    """Why ``module`` cannot run ``backend`` (None: it can)."""
    if backend == RESTORE:
        return None
    name = type(module).__name__
    if not _registered:
        return f"backend '{BACKEND}' is not registered: call sj_temporal_fusion.register()"
    problem = class_problem(module, NODES, DYNAMICS)
    if problem:
        return problem
    if getattr(module, "_neuron_precision", None) is not None:
        return (f"{name} has a SpikingJelly 2 neuron precision policy ({module._neuron_precision}), which "
                f"SpikingJelly's own kernels implement: it stays on them")
    return surrogate_problem(module.surrogate_function) or dynamics_problem(module) or options_problem(module)


def switch(module, backend: str) -> None:
    if backend == RESTORE:
        vars(module).pop("backend", None)
        return
    _install()
    module.backend = BACKEND_MARK
