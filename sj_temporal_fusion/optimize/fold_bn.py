"""BatchNorm folded into the neuron kernel: ``optimize(net, fold_bn=True)``.

Folded, where a BatchNorm's output provably goes to one of our neurons and nowhere else: a
BatchNorm (nn.BatchNorm1d/2d/3d or SpikingJelly's layer.BatchNorm1d/2d/3d, exact classes)
immediately followed by a neuron in an nn.Sequential or layer.SeqToANNContainer (also as the last
module of a Sequential / SeqToANNContainer that is so followed), and the bn<i> -> sn<i> pairs of
SpikingJelly's spiking_resnet and sew_resnet (blocks and stem) whose forward passes bn<i>'s
output straight to sn<i>. Nothing else is folded (a BatchNorm followed by a residual add keeps
running as before).

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

BACKEND = "temporal_fusion"


def _neuron_classes() -> tuple:
    from ..spikingjelly import NODES
    return NODES


def fold(net: torch.nn.Module) -> list:
    """Fold every pair of ``fold_pairs(net)``; returns the pairs."""
    pairs = fold_pairs(net)
    for bn, node in pairs:
        link = _FoldLink(bn, node)
        bn.forward = _DeferredBatchNorm(link)
        node.forward = _FoldedNeuron(link)
    return pairs


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
    (SpikingJelly 0.0.0.0.14's source; bn2 of a Spiking-ResNet BasicBlock, bn3 of its Bottleneck
    and the downsample's BatchNorm go to a residual add and are not listed)."""
    from spikingjelly.activation_based.model import sew_resnet, spiking_resnet
    return {spiking_resnet.SpikingResNet: (("bn1", "sn1"),), spiking_resnet.BasicBlock: (("bn1", "sn1"),),
            spiking_resnet.Bottleneck: (("bn1", "sn1"), ("bn2", "sn2")),
            sew_resnet.SEWResNet: (("bn1", "sn1"),), sew_resnet.BasicBlock: (("bn1", "sn1"), ("bn2", "sn2")),
            sew_resnet.Bottleneck: (("bn1", "sn1"), ("bn2", "sn2"), ("bn3", "sn3"))}


def _sequential_classes() -> tuple:
    from spikingjelly.activation_based import layer
    return (torch.nn.Sequential, layer.SeqToANNContainer)  # children run in order, each output to the next


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
    """What a folded BatchNorm hands its neuron during one forward: its input and channel dim."""

    def __init__(self, bn, neuron):
        self.bn, self.neuron, self.pending = bn, neuron, None

    def __getstate__(self):
        return {"bn": self.bn, "neuron": self.neuron, "pending": None}


def _channel_dim(bn) -> int:
    # SpikingJelly's BatchNorm in step mode 'm' takes (T, B, C, *), the others (B, C, *).
    return 2 if getattr(bn, "step_mode", "s") == "m" else 1


def _foldable_now(bn, node, x) -> bool:
    from ..ops import SUPPORTED_DTYPES
    from ..spikingjelly import fusable
    cdim = _channel_dim(bn)
    return (getattr(node, "backend", None) == BACKEND and getattr(node, "step_mode", None) in ("s", "m")
            and fusable(node) and isinstance(x, torch.Tensor) and x.dtype in SUPPORTED_DTYPES
            and x.device.type in ("cpu", "cuda") and x.dim() > cdim and x.shape[cdim] == bn.num_features
            and x.numel() > 0 and x.is_contiguous())


class _DeferredBatchNorm:
    """A folded BatchNorm's forward: returns its input and hands itself to its neuron; runs the
    BatchNorm as before when the neuron cannot take it."""

    def __init__(self, link: _FoldLink):
        self.link = link

    def __call__(self, x):
        link = self.link
        link.pending = None
        if not _foldable_now(link.bn, link.neuron, x):
            return type(link.bn).forward(link.bn, x)
        link.pending = (x, _channel_dim(link.bn))
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
        u, cdim = pending
        if not (isinstance(x, torch.Tensor) and x.is_contiguous() and x.numel() == u.numel()
                and x.data_ptr() == u.data_ptr() and x.dtype == u.dtype):
            raise RuntimeError(
                f"optimize(fold_bn=True): the neuron {type(node).__name__} did not receive its folded "
                f"BatchNorm's output directly (something between them changed it), so folding would be "
                f"wrong: call sj_temporal_fusion.optimize(net, fold_bn=False) for this network")
        from ..spikingjelly import fused_multi_step, fused_single_step
        fold = _batch_norm_fold(link.bn, u, cdim)
        return fused_multi_step(node, x, fold) if node.step_mode == "m" else fused_single_step(node, x, fold)


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
