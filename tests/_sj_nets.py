"""Tiny networks in the shape of the SNN codebases that run SpikingJelly's cupy backend today: a
Spikformer-style network (the package's bench model at test size) and, written here for the
tests, a Spike-driven-style PLIF block and a SEW-style IF block (clock_driven nodes), and a net
of activation_based subclasses with a no-argument __init__ (SpikingResformer's way of fixing a
node's options). Inputs (T, B, C, H, W)."""
from __future__ import annotations

import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron as ab_neuron, surrogate as ab_surrogate
from spikingjelly.clock_driven import neuron, surrogate

from sj_temporal_fusion.bench import spikformer
from sj_temporal_fusion.bench.spikformer import conv_bn, lif  # noqa: F401 - the other nets' building blocks

T, B, C, H, W = 4, 2, 3, 16, 16
CLASSES = 10


class Spikformer(spikformer.Spikformer):
    """The package's Spikformer (sj_temporal_fusion/bench/spikformer.py, which bench net times) at
    test size: dim 16, 2 heads, one block, MLP ratio 2, two Conv-BN-LIF patch stages each with max
    pooling, 16 tokens from 16 x 16 input."""

    def __init__(self, backend="torch", dim=16):
        super().__init__(backend, in_channels=C, num_classes=CLASSES, dim=dim, heads=2, depth=1, mlp_ratio=2,
                         stages=2)


class SpikeDrivenPLIFBlock(nn.Module):
    """Spike-driven Transformer's membrane shortcut: PLIF before each Conv-BN, the residual added
    to the membrane input of the next stage."""

    def __init__(self, backend="torch", dim=8):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(C, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim)
        plif = dict(init_tau=2.0, detach_reset=True, surrogate_function=surrogate.ATan(alpha=3.0), backend=backend)
        self.lif1, self.lif2 = neuron.MultiStepParametricLIFNode(**plif), neuron.MultiStepParametricLIFNode(**plif)
        self.conv1, self.bn1 = nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim)
        self.conv2, self.bn2 = nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x):
        x = conv_bn(x, self.stem, self.stem_bn)
        x = x + conv_bn(self.lif1(x), self.conv1, self.bn1)
        x = x + conv_bn(self.lif2(x), self.conv2, self.bn2)
        return self.head(x.mean((3, 4))).mean(0)


class SEWBlockNet(nn.Module):
    """SEW-ResNet's basic block on IF nodes with ADD connections: out = sn(bn(conv(...))) + identity."""

    def __init__(self, backend="torch", dim=8):
        super().__init__()
        if_node = dict(detach_reset=True, surrogate_function=surrogate.Sigmoid(alpha=4.0), backend=backend)
        self.stem, self.stem_bn, self.stem_sn = nn.Conv2d(C, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), \
            neuron.MultiStepIFNode(**if_node)
        self.conv1, self.bn1, self.sn1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), \
            neuron.MultiStepIFNode(**if_node)
        self.conv2, self.bn2, self.sn2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), \
            neuron.MultiStepIFNode(**if_node)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x):
        x = self.stem_sn(conv_bn(x, self.stem, self.stem_bn))
        out = self.sn1(conv_bn(x, self.conv1, self.bn1))
        out = self.sn2(conv_bn(out, self.conv2, self.bn2))
        x = out + x  # ADD
        return self.head(x.mean((3, 4))).mean(0)


class ResformerLIF(ab_neuron.LIFNode):
    """A node whose options are fixed by its no-argument __init__, as SpikingResformer writes them."""

    def __init__(self):
        super().__init__(tau=2.0, v_threshold=1.0, surrogate_function=ab_surrogate.ATan(), detach_reset=True,
                         step_mode="m", backend="torch", store_v_seq=False)


class ActivationBasedSubclassNet(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.conv1, self.bn1, self.sn1 = nn.Conv2d(C, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), ResformerLIF()
        self.conv2, self.bn2, self.sn2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), ResformerLIF()
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x):
        x = self.sn1(conv_bn(x, self.conv1, self.bn1))
        x = self.sn2(conv_bn(x, self.conv2, self.bn2))
        return self.head(x.mean((3, 4))).mean(0)


class VSeqReadout(nn.Module):
    """A network whose output is a non-firing readout node's membrane potential sequence (v_seq)."""

    def __init__(self, backend="torch", dim=8):
        super().__init__()
        self.conv, self.bn, self.sn = nn.Conv2d(C, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), lif(backend)
        self.fc = nn.Linear(dim, CLASSES)
        self.readout = neuron.MultiStepLIFNode(tau=2.0, v_threshold=1e9, backend=backend)

    def forward(self, x):
        x = self.sn(conv_bn(x, self.conv, self.bn))
        self.readout(self.fc(x.mean((3, 4))))
        return self.readout.v_seq.mean(0)


NETS = {"spikformer": Spikformer, "spike_driven_plif": SpikeDrivenPLIFBlock, "sew_if_add": SEWBlockNet,
        "activation_based_subclass": ActivationBasedSubclassNet, "v_seq_loss": VSeqReadout}


def build(name, seed=0):
    torch.manual_seed(seed)
    net = NETS[name]() if name == "activation_based_subclass" else NETS[name]("torch")
    return net


def neurons(net):
    return [m for m in net.modules() if isinstance(m, (neuron.BaseNode, ab_neuron.BaseNode))]


def batches(count=3, seed=1, sizes=(B, B, B + 1)):
    """Consecutive batches (the last one larger: the state must come back from reset_net)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(T, sizes[i % len(sizes)], C, H, W, generator=g),
             torch.randint(CLASSES, (sizes[i % len(sizes)],), generator=g)) for i in range(count)]
