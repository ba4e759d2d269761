"""Tiny networks in the shape of the SNN codebases that run SpikingJelly's cupy backend today,
written here for the tests: a Spikformer-style network and a Spike-driven-style PLIF block and a
SEW-style IF block (clock_driven nodes), and a net of activation_based subclasses with a
no-argument __init__ (SpikingResformer's way of fixing a node's options). Inputs (T, B, C, H, W)."""
from __future__ import annotations

import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron as ab_neuron, surrogate as ab_surrogate
from spikingjelly.clock_driven import neuron, surrogate

T, B, C, H, W = 4, 2, 3, 16, 16
CLASSES = 10


def lif(backend, **kw):
    return neuron.MultiStepLIFNode(tau=2.0, detach_reset=True, backend=backend, **kw)


def conv_bn(x, conv, bn):
    """A (T, B, ...) sequence through a per-step conv and BatchNorm2d, as SeqToANNContainer does."""
    t, b = x.shape[:2]
    y = bn(conv(x.flatten(0, 1)))
    return y.reshape(t, b, *y.shape[1:])


def linear_bn(x, linear, bn):
    """Spikformer's Linear-BatchNorm1d on (T, B, N, D): the BatchNorm1d normalises D, between two
    transposes."""
    t, b, n, d = x.shape
    y = bn(linear(x.flatten(0, 1)).transpose(-1, -2)).transpose(-1, -2)
    return y.reshape(t, b, n, -1).contiguous()


class PatchEmbedding(nn.Module):
    """Conv-BN-LIF stages with max pooling, then a relative position embedding Conv-BN-LIF added."""

    def __init__(self, backend, dim=16):
        super().__init__()
        self.conv1, self.bn1, self.lif1 = nn.Conv2d(C, dim // 2, 3, padding=1, bias=False), nn.BatchNorm2d(dim // 2), lif(backend)
        self.conv2, self.bn2, self.lif2 = nn.Conv2d(dim // 2, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), lif(backend)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.rpe_conv, self.rpe_bn, self.rpe_lif = nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), lif(backend)

    def forward(self, x):
        x = self.lif1(conv_bn(x, self.conv1, self.bn1))
        x = self.pool(x.flatten(0, 1)).reshape(*x.shape[:3], H // 2, W // 2)
        x = self.lif2(conv_bn(x, self.conv2, self.bn2))
        x = self.pool(x.flatten(0, 1)).reshape(*x.shape[:3], H // 4, W // 4)
        x = x + self.rpe_lif(conv_bn(x, self.rpe_conv, self.rpe_bn))
        return x.flatten(-2).transpose(-1, -2).contiguous()  # (T, B, N, D)


class SpikingSelfAttention(nn.Module):
    def __init__(self, backend, dim=16, heads=2):
        super().__init__()
        self.heads, self.scale = heads, 0.125
        for name in ("q", "k", "v", "proj"):
            setattr(self, f"{name}_linear", nn.Linear(dim, dim))
            setattr(self, f"{name}_bn", nn.BatchNorm1d(dim))
            setattr(self, f"{name}_lif", lif(backend))
        self.attn_lif = lif(backend, v_threshold=0.5)

    def _heads(self, x):
        t, b, n, d = x.shape
        return x.reshape(t, b, n, self.heads, d // self.heads).permute(0, 1, 3, 2, 4).contiguous()

    def forward(self, x):
        t, b, n, d = x.shape
        q, k, v = (self._heads(getattr(self, f"{s}_lif")(linear_bn(x, getattr(self, f"{s}_linear"),
                                                                     getattr(self, f"{s}_bn")))) for s in "qkv")
        x = (q @ k.transpose(-2, -1)) * self.scale @ v
        x = self.attn_lif(x.transpose(2, 3).reshape(t, b, n, d).contiguous())
        return self.proj_lif(linear_bn(x, self.proj_linear, self.proj_bn))


class MLP(nn.Module):
    def __init__(self, backend, dim=16, hidden=32):
        super().__init__()
        self.fc1_linear, self.fc1_bn, self.fc1_lif = nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), lif(backend)
        self.fc2_linear, self.fc2_bn, self.fc2_lif = nn.Linear(hidden, dim), nn.BatchNorm1d(dim), lif(backend)

    def forward(self, x):
        x = self.fc1_lif(linear_bn(x, self.fc1_linear, self.fc1_bn))
        return self.fc2_lif(linear_bn(x, self.fc2_linear, self.fc2_bn))


class Spikformer(nn.Module):
    def __init__(self, backend="torch", dim=16):
        super().__init__()
        self.patch_embed = PatchEmbedding(backend, dim)
        self.attn, self.mlp = SpikingSelfAttention(backend, dim), MLP(backend, dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x):
        x = self.patch_embed(x)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean(2)).mean(0)


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
