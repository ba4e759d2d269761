"""BatchNorm folded into the neuron kernel: ``optimize(net, fold_bn=True)`` (pairs found) or
``optimize(net, fold_bn=[(bn, neuron), ...])`` (pairs given).

Found, where a BatchNorm's output provably goes to one of our neurons and nowhere else: a
BatchNorm (nn.BatchNorm1d/2d/3d or SpikingJelly's layer.BatchNorm1d/2d/3d, exact classes)
immediately followed by a neuron (either SpikingJelly API) in an nn.Sequential or a
SeqToANNContainer of either API (also as the last module of a Sequential / SeqToANNContainer that
is so followed), and the bn<i> -> sn<i> pairs of SpikingJelly's spiking_resnet and sew_resnet
(blocks and stem) whose forward passes bn<i>'s output straight to sn<i>. Nothing else is found (a
BatchNorm followed by a residual add keeps running as before).

Given: models that apply their BatchNorms in forward code (Spikformer's
``bn(linear(x.flatten(0, 1)).transpose(-1, -2)).transpose(-1, -2).reshape(T, B, N, D)``) show no
pattern to find, so the caller names the pairs. Only the forward code shows where a BatchNorm's
output goes, so the caller asserts that it goes to that neuron only, through layout changes only
(views, reshapes, a ``.contiguous()`` of a contiguous tensor). What is checked: the classes, each
module once in ``net`` and in one pair, the neuron's model (fusable), and at every call that the
BatchNorm's input is dense with num_features channels and that the neuron receives a contiguous
tensor over the very same memory, unchanged since (same address, element count, dtype, in-place
version): a copy, an arithmetic op or an in-place write between them raises an error instead of
folding. A BatchNorm output that also went somewhere else cannot be detected: there it would be
the un-normalised input. The channel of each element follows from the BatchNorm input's strides:
BatchNorm1d on the (T*B, D, N) transpose of a (T*B, N, D) tensor normalises D, the last dimension
of the neuron's (T, B, N, D) input (inner 1, channels D, in ``functional.batch_norm_scale_shift``'s
terms); Conv-BatchNorm2d on (T*B, C, H, W) gives inner H*W, channels C.

A folded BatchNorm's forward returns its input unchanged and hands itself to its neuron, which
computes the batch statistics (training; running statistics in eval), updates running_mean /
running_var / num_batches_tracked as nn.BatchNorm does, and applies x * scale + shift inside the
kernel's read of x: the normalised tensor is neither written nor kept for the backward, which
recomputes it and also yields the BatchNorm's gradients (through the batch statistics). Results
equal the unfolded network to rounding. Per call, a pair whose neuron does not run backend
'temporal_fusion' (or whose input the kernel cannot take) runs both modules unchanged. Forward
hooks on a folded BatchNorm see its input as output. Both forwards are instance attributes found
by type (``unfold``), so they deep-copy and pickle with the model.
"""
from __future__ import annotations

import torch

from .. import versions

BACKEND = "temporal_fusion"


def _neuron_classes() -> tuple:
    """Every neuron class a front end serves, in either SpikingJelly API."""
    from ..frontends import FRONTENDS
    return tuple(cls for frontend in FRONTENDS for cls in frontend.NODES)


def _frontend(node):
    """The front end whose classes ``node`` is an instance of, or None."""
    from ..frontends import FRONTENDS
    return next((f for f in FRONTENDS if isinstance(node, f.NODES)), None)


def fold(net: torch.nn.Module, pairs=None) -> list:
    """Fold every pair of ``fold_pairs(net)``, or the (BatchNorm, neuron) ``pairs`` given (checked
    by ``check_pairs``); returns the pairs folded."""
    explicit = pairs is not None
    pairs = check_pairs(net, pairs) if explicit else fold_pairs(net)
    for bn, node in pairs:
        link = _FoldLink(bn, node, explicit)
        bn.forward = _DeferredBatchNorm(link)
        node.forward = _FoldedNeuron(link)
    return pairs


def check_pairs(net: torch.nn.Module, pairs) -> list:
    """``pairs`` as a list of (BatchNorm, neuron) modules of ``net``, or a ValueError naming the
    pair, what is wrong and the fix. Checked: the classes (exact BatchNorm classes: a subclass
    may change the forward; a neuron whose model the kernels run), each module once in ``net``
    and in one pair. Not checkable without tracing: that the BatchNorm's output goes to the
    neuron only; the caller asserts it (see the module docstring)."""
    if isinstance(pairs, torch.nn.Module) or not hasattr(pairs, "__iter__"):
        raise ValueError(f"fold_bn must be True, False or a list of (BatchNorm, neuron) module pairs, got "
                         f"{type(pairs).__name__}")
    pairs = list(pairs)
    counts: dict = {}
    for module in net.modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    names = {id(m): name for name, m in net.named_modules()}
    seen: set = set()
    bn_names = ", ".join(c.__module__.split(".")[0] + "." + c.__name__ for c in _batch_norm_classes())
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"fold_bn[{i}] must be a (BatchNorm, neuron) pair of modules, got {pair!r}")
        bn, node = pair
        what = f"fold_bn[{i}] = ({type(bn).__name__}, {type(node).__name__})"
        if type(bn) not in _batch_norm_classes():
            raise ValueError(f"{what}: the first module must be a BatchNorm of the classes {bn_names} (exact: a "
                             f"subclass may change what forward computes); leave this pair out")
        if not isinstance(node, _neuron_classes()):
            raise ValueError(f"{what}: the second module must be a neuron the kernels serve "
                             f"({', '.join(c.__name__ for c in _neuron_classes())}); leave this pair out")
        if not _frontend(node).fusable(node):
            raise ValueError(f"{what}: {type(node).__name__} has its own dynamics, which the kernels do not "
                             f"run; leave this pair out")
        for module in (bn, node):
            if counts.get(id(module), 0) != 1:
                where = "is not a module of net" if id(module) not in counts else "occurs more than once in net"
                raise ValueError(f"{what}: {type(module).__name__} {where}; fold only modules used once")
            if id(module) in seen:
                raise ValueError(f"{what}: {names[id(module)]!r} is in an earlier pair too; each module folds once")
            seen.add(id(module))
    return [tuple(pair) for pair in pairs]


def unfold(net: torch.nn.Module) -> None:
    """Remove the folded forwards from every module of ``net`` (found by type, so this works on
    deep copies and unpickled models)."""
    for module in net.modules():
        if isinstance(module.__dict__.get("forward"), (_DeferredBatchNorm, _FoldedNeuron)):
            del module.__dict__["forward"]


def _batch_norm_classes() -> tuple:
    from spikingjelly.activation_based import layer
    return (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, layer.BatchNorm1d, layer.BatchNorm2d,
            layer.BatchNorm3d)


def _block_pairs() -> dict:
    """Exact block class -> its (BatchNorm, neuron) attribute pairs whose forward is ``sn(bn(.))``
    (SpikingJelly 0.0.0.0.14's and 2.0's source; bn2 of a Spiking-ResNet BasicBlock, bn3 of its Bottleneck
    and the downsample's BatchNorm go to a residual add and are not listed)."""
    from spikingjelly.activation_based.model import sew_resnet, spiking_resnet
    return {spiking_resnet.SpikingResNet: (("bn1", "sn1"),), spiking_resnet.BasicBlock: (("bn1", "sn1"),),
            spiking_resnet.Bottleneck: (("bn1", "sn1"), ("bn2", "sn2")),
            sew_resnet.SEWResNet: (("bn1", "sn1"),), sew_resnet.BasicBlock: (("bn1", "sn1"), ("bn2", "sn2")),
            sew_resnet.Bottleneck: (("bn1", "sn1"), ("bn2", "sn2"), ("bn3", "sn3"))}


def _sequential_classes() -> tuple:
    from spikingjelly.activation_based import layer
    # Children run in order, each output to the next (the containers reshape (T, B) <-> T * B).
    # clock_driven's container is a stand-in matching nothing under SpikingJelly 2.
    return (torch.nn.Sequential, layer.SeqToANNContainer, versions.clock_driven("layer").SeqToANNContainer)


def _last_batch_norm(module):
    """The BatchNorm whose output is ``module``'s output unchanged up to a reshape, or None."""
    if type(module) in _batch_norm_classes():
        return module
    if type(module) in _sequential_classes() and len(module) > 0:
        return _last_batch_norm(module[-1])
    return None


def fold_pairs(net: torch.nn.Module) -> list:
    """The (BatchNorm, neuron) pairs of ``net`` that ``optimize(net, fold_bn=True)`` folds (see
    the module docstring); a module that occurs more than once in ``net`` is never folded."""
    nodes, blocks = _neuron_classes(), _block_pairs()
    found = []
    for module in net.modules():
        if type(module) in blocks:
            for bn_name, sn_name in blocks[type(module)]:
                bn, node = getattr(module, bn_name, None), getattr(module, sn_name, None)
                if type(bn) in _batch_norm_classes() and isinstance(node, nodes):
                    found.append((bn, node))
        elif type(module) in _sequential_classes():
            children = list(module)
            for first, second in zip(children, children[1:]):
                bn = _last_batch_norm(first)
                if bn is not None and isinstance(second, nodes):
                    found.append((bn, second))
    counts: dict = {}
    for module in net.modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    used = [id(m) for pair in found for m in pair]
    return [(bn, node) for bn, node in found
            if counts[id(bn)] == 1 and counts[id(node)] == 1 and used.count(id(bn)) == 1 and used.count(id(node)) == 1]


def folded(net: torch.nn.Module) -> list:
    """Names of the (BatchNorm, neuron) pairs folded in ``net`` now."""
    names = {id(m): name for name, m in net.named_modules()}
    return [(names.get(id(f.link.bn)), names.get(id(f.link.neuron))) for m in net.modules()
            for f in [m.__dict__.get("forward")] if isinstance(f, _DeferredBatchNorm)]


class _FoldLink:
    """What a folded BatchNorm hands its neuron during one forward: its input, its in-place
    version and its (inner, channels) layout. ``explicit``: a pair the caller named (its neuron
    may receive the BatchNorm's output through layout changes) rather than one found."""

    def __init__(self, bn, neuron, explicit=False):
        self.bn, self.neuron, self.explicit, self.pending = bn, neuron, explicit, None

    def __getstate__(self):
        return {"bn": self.bn, "neuron": self.neuron, "explicit": self.explicit, "pending": None}

    def __setstate__(self, state):
        self.__dict__.update({"explicit": False, **state})  # pickles from before explicit pairs


def _channel_dim(bn) -> int:
    # SpikingJelly's BatchNorm in step mode 'm' takes (T, B, C, *), the others (B, C, *).
    return 2 if getattr(bn, "step_mode", "s") == "m" else 1


def _layout(x, cdim: int):
    """(inner, channels) such that the element at memory offset o of ``x`` (from its first
    element) is in channel (o // inner) % channels, when ``x`` is dense (a permutation of a
    contiguous tensor); else None."""
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), -x.size(d)))
    if not x.permute(order).is_contiguous():
        return None
    channels = x.shape[cdim]
    # In that order the dims after cdim have sizes multiplying to its stride: one channel's run.
    return (x.stride(cdim) if channels > 1 else 1), channels


def _step_mode_served(node) -> bool:
    # clock_driven's served classes are multi-step only (no step_mode); the others carry a mode.
    return getattr(node, "step_mode", "m") in ("s", "m")


def _foldable_now(link, x) -> bool:
    from ..ops import SUPPORTED_DTYPES
    bn, node = link.bn, link.neuron
    frontend = _frontend(node)
    cdim = _channel_dim(bn)
    return (frontend is not None and frontend.registered() and getattr(node, "backend", None) == BACKEND
            and _step_mode_served(node) and frontend.fusable(node) and isinstance(x, torch.Tensor)
            and x.dtype in SUPPORTED_DTYPES and x.device.type in ("cpu", "cuda") and x.dim() > cdim
            and x.shape[cdim] == bn.num_features and x.numel() > 0
            # A found pair's neuron gets x itself (or a reshape, a copy unless x is contiguous);
            # a named pair's gets it through layout changes, so any dense layout is read by strides.
            and (x.is_contiguous() or (link.explicit and _layout(x, cdim) is not None)))


class _DeferredBatchNorm:
    """A folded BatchNorm's forward: returns its input and hands itself to its neuron; runs the
    BatchNorm as before when the neuron cannot take it."""

    def __init__(self, link: _FoldLink):
        self.link = link

    def __call__(self, x):
        link = self.link
        link.pending = None
        if not _foldable_now(link, x):
            return type(link.bn).forward(link.bn, x)
        link.pending = (x, x._version, _layout(x, _channel_dim(link.bn)))
        return x


class _FoldedNeuron:
    """The neuron's forward: with a BatchNorm handed over, runs it inside the kernel."""

    def __init__(self, link: _FoldLink):
        self.link = link

    def __call__(self, x):
        link = self.link
        pending, link.pending = link.pending, None
        node = link.neuron
        if pending is None:
            return type(node).forward(node, x)
        u, version, (inner, channels) = pending
        # Contiguous over the BatchNorm input's memory: x's flat index is u's memory offset, so
        # u's layout gives each element's channel.
        if not (isinstance(x, torch.Tensor) and x.is_contiguous() and x.numel() == u.numel()
                and x.data_ptr() == u.data_ptr() and x.dtype == u.dtype and x._version == version):
            fix = ("leave this pair out of fold_bn=[...]" if link.explicit
                   else "call sj_temporal_fusion.optimize(net, fold_bn=False) for this network")
            raise RuntimeError(
                f"optimize(fold_bn=...): the neuron {type(node).__name__} did not receive its folded "
                f"BatchNorm's output unchanged (a copy, an arithmetic op or an in-place write between them, "
                f"or the BatchNorm's output went elsewhere), so folding would be wrong: {fix}")
        fold = _batch_norm_fold(link.bn, x.view(-1, channels, inner), 1)
        return _frontend(node).fused_forward(node, x, fold)


def _batch_norm_fold(bn, x, channel_dim: int) -> tuple:
    """torch.nn.modules.batchnorm._BatchNorm.forward's bookkeeping (num_batches_tracked, the
    exponential average factor, which statistics), then the affine the kernel applies."""
    from ..functional import batch_norm_scale_shift
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return batch_norm_scale_shift(x, channel_dim, bn.running_mean if track else None,
                                  bn.running_var if track else None, bn.weight, bn.bias, batch_stats, factor, bn.eps)
