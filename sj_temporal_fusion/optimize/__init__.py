"""One switch for whole-network options: ``sj_temporal_fusion.optimize(net)``.

    net = sj_temporal_fusion.optimize(net)                # spike_bits=True
    net = sj_temporal_fusion.optimize(net, fold_bn=True)  # and BatchNorm folded into the neurons
    net = sj_temporal_fusion.optimize(net, fold_bn=[(bn, lif), ...])  # the pairs named
    sj_temporal_fusion.optimize(net, spike_bits=False)      # back to plain
    sj_temporal_fusion.optimize.folded(net)               # the folded (BatchNorm, neuron) names

One module per option: ``spike_bits.py`` (spikes that a later layer saves for its backward kept
as 1 bit per element and restored exactly: gradients bit for bit those without it; forward hooks
on ``net``, its SpikingJelly neurons of either API and its max-pooling layers) and ``fold_bn.py``
(BatchNorm folded into the neuron kernel where its output provably goes to one of our neurons
and nowhere else, or for the pairs the caller names: an instance-level ``forward`` on each folded
BatchNorm and on its neuron). Parameters,
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


def optimize(net: torch.nn.Module, spike_bits: bool = True, fold_bn=False) -> torch.nn.Module:
    """Switch whole-network options on ``net`` (a SpikingJelly model, either API, whose neurons
    run backend 'temporal_fusion'); returns ``net`` itself. ``fold_bn``: False, True (the pairs
    ``fold_pairs(net)`` finds) or a list of (BatchNorm, neuron) module pairs of ``net`` whose
    BatchNorm output the caller asserts goes to that neuron only (models that apply BatchNorms in
    forward code, such as Spikformer's; checked as ``fold_bn.check_pairs`` says). Calling it
    again replaces the earlier options; ``optimize(net, spike_bits=False)`` removes everything it
    added. See the package docstring."""
    pairs = None if isinstance(fold_bn, bool) else _fold_bn.check_pairs(net, fold_bn)  # before any change
    _fold_bn.unfold(net)
    _spike_bits.detach(net)
    if pairs is not None:
        _fold_bn.fold(net, pairs)
    elif fold_bn and not _fold_bn.fold(net):
        warnings.warn("optimize(fold_bn=True): no BatchNorm of this network feeds a neuron in a pattern "
                      "that can be found (see sj_temporal_fusion.optimize.fold_bn's docstring); nothing "
                      "folded. A model that applies its BatchNorms in forward code can name the pairs: "
                      "optimize(net, fold_bn=[(bn, neuron), ...])", stacklevel=2)
    if spike_bits and not _spike_bits.attach(net, _fold_bn._neuron_classes()):
        warnings.warn("optimize(spike_bits=True): no neuron of this network runs backend "
                      "'temporal_fusion' yet, so no spikes will be packed until one does: call "
                      "sj_temporal_fusion.set_backend(net, 'temporal_fusion')", stacklevel=2)
    return net


def optimized(net: torch.nn.Module) -> dict:
    """The options ``optimize`` set on ``net``: {'spike_bits': bool, 'fold_bn': bool}."""
    return {"spike_bits": _spike_bits.attached(net), "fold_bn": bool(folded(net))}


# The package's function is what ``sj_temporal_fusion.optimize`` names; these make the inspection
# helpers reachable from it as the README writes them.
optimize.folded, optimize.fold_pairs, optimize.optimized = folded, fold_pairs, optimized
