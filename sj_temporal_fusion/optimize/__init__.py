"""One switch for whole-network options: ``sj_temporal_fusion.optimize(net)``.

    net = sj_temporal_fusion.optimize(net)                # spike_bits=True
    net = sj_temporal_fusion.optimize(net, fold_bn=True)  # and BatchNorm folded into the neurons
    sj_temporal_fusion.optimize(net, spike_bits=False)      # back to plain
    sj_temporal_fusion.optimize.folded(net)               # the folded (BatchNorm, neuron) names

One module per option: ``spike_bits.py`` (spikes that a later layer saves for its backward kept
as 1 bit per element and restored exactly: gradients bit for bit those without it; forward hooks
on ``net``, its SpikingJelly neurons and its max-pooling layers) and ``fold_bn.py`` (BatchNorm
folded into the neuron kernel where its output provably goes to one of our neurons and nowhere
else: an instance-level ``forward`` on each folded BatchNorm and on its neuron). Parameters,
buffers, ``state_dict`` keys and values, the step mode and the backends are untouched, so
checkpoints load with and without it, and the hooks and forwards deep-copy and pickle with the
model.

``sj_temporal_fusion.optimize`` is the function ``optimize`` below (``sj_temporal_fusion``'s
``__init__`` exports it under this package's name); ``folded``, ``fold_pairs`` and ``optimized``
are attributes of that function as well as names of this package, so
``sj_temporal_fusion.optimize.folded(net)`` and ``from sj_temporal_fusion.optimize import folded``
both work. The submodules are reached with ``from sj_temporal_fusion.optimize import spike_bits``
(``import sj_temporal_fusion.optimize.spike_bits as m`` resolves ``optimize`` to the function).
"""
from __future__ import annotations

import warnings

import torch

from . import fold_bn as _fold_bn, spike_bits as _spike_bits
from .fold_bn import fold_pairs, folded

__all__ = ["fold_pairs", "folded", "optimize", "optimized"]


def _neuron_classes() -> tuple:
    from ..spikingjelly import NODES
    return NODES


def optimize(net: torch.nn.Module, spike_bits: bool = True, fold_bn: bool = False) -> torch.nn.Module:
    """Switch whole-network options on ``net`` (a SpikingJelly model whose neurons run backend
    'temporal_fusion'); returns ``net`` itself. Calling it again replaces the earlier options;
    ``optimize(net, spike_bits=False)`` removes everything it added. See the package docstring."""
    _fold_bn.unfold(net)
    _spike_bits.detach(net)
    if fold_bn and not _fold_bn.fold(net):
        warnings.warn("optimize(fold_bn=True): no BatchNorm of this network feeds a neuron in a pattern "
                      "that can be folded (see sj_temporal_fusion.optimize.fold_bn's docstring); nothing "
                      "folded", stacklevel=2)
    if spike_bits and not _spike_bits.attach(net, _neuron_classes()):
        warnings.warn("optimize(spike_bits=True): no neuron of this network runs backend "
                      "'temporal_fusion' yet, so no spikes will be packed until one does: call "
                      "spikingjelly.activation_based.functional.set_backend(net, 'temporal_fusion')",
                      stacklevel=2)
    return net


def optimized(net: torch.nn.Module) -> dict:
    """The options ``optimize`` set on ``net``: {'spike_bits': bool, 'fold_bn': bool}."""
    return {"spike_bits": _spike_bits.attached(net), "fold_bn": bool(folded(net))}


# The package's function is what ``sj_temporal_fusion.optimize`` names; these make the inspection
# helpers reachable from it as the README writes them.
optimize.folded, optimize.fold_pairs, optimize.optimized = folded, fold_pairs, optimized
