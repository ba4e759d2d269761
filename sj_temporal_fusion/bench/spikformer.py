"""A small Spikformer (Zhou et al., "Spikformer: When Spiking Neural Network Meets Transformer",
ICLR 2023) written as its public code writes it, for ``bench net`` and the tests: SpikingJelly
0.0.0.0.14's clock_driven ``MultiStepLIFNode(tau=2.0, detach_reset=True, backend=...)`` everywhere
(its default Sigmoid surrogate), the attention LIF at v_threshold = 0.5, and every BatchNorm
applied in forward code, not in a Sequential:

    patch embedding        Conv-BatchNorm2d-LIF stages of widths dim / 2^k, 3 x 3 / 2 max pooling
                           after the last two, then a relative position embedding Conv-BN2d-LIF
                           added to its input; tokens N = H * W / 16
    spiking self-attention Linear-BatchNorm1d-LIF for q, k and v (the BatchNorm1d normalises D on
                           the (T * B, D, N) transpose), per head (q k^T) v * scale without
                           softmax, the attention LIF, then a Linear-BN1d-LIF projection
    MLP                    Linear-BN1d-LIF to dim * mlp_ratio and back
Each block adds its attention's and its MLP's output to its input; a linear head reads the mean
over tokens, averaged over time. Input (T, B, C, H, W), output (B, classes).

``fold_pairs(net)`` names the (BatchNorm, neuron) pairs whose BatchNorm output goes to that neuron
only, for ``sj_temporal_fusion.optimize(net, fold_bn=fold_pairs(net))``: nothing in the module
tree shows these pairs, the forward code does.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def lif(backend: str, **options) -> nn.Module:
    from spikingjelly.clock_driven import neuron
    import sj_temporal_fusion  # noqa: F401 - registers the backend in the constructor's check
    return neuron.MultiStepLIFNode(tau=2.0, detach_reset=True, backend=backend, **options)


def conv_bn(x: torch.Tensor, conv: nn.Module, bn: nn.Module) -> torch.Tensor:
    """(T, B, C, H, W) through a per-step convolution and BatchNorm2d, as SeqToANNContainer runs them."""
    t, b = x.shape[:2]
    y = bn(conv(x.flatten(0, 1)))
    return y.reshape(t, b, *y.shape[1:])


def linear_bn(x: torch.Tensor, linear: nn.Module, bn: nn.Module) -> torch.Tensor:
    """(T, B, N, D) through Linear and BatchNorm1d over the features, between two transposes."""
    t, b, n, _ = x.shape
    y = bn(linear(x.flatten(0, 1)).transpose(-1, -2)).transpose(-1, -2)
    return y.reshape(t, b, n, -1).contiguous()


class PatchEmbedding(nn.Module):
    def __init__(self, backend: str, in_channels: int, dim: int, stages: int = 4):
        super().__init__()
        widths = [dim // 2 ** (stages - 1 - i) for i in range(stages)]
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
                                   for c_in, c_out in zip([in_channels] + widths[:-1], widths))
        self.bns = nn.ModuleList(nn.BatchNorm2d(w) for w in widths)
        self.lifs = nn.ModuleList(lif(backend) for _ in widths)
        self.pooled = [i >= stages - 2 for i in range(stages)]
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.rpe_conv, self.rpe_bn, self.rpe_lif = nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), \
            lif(backend)

    def forward(self, x):
        for conv, bn, node, pooled in zip(self.convs, self.bns, self.lifs, self.pooled):
            x = node(conv_bn(x, conv, bn))
            if pooled:
                y = self.pool(x.flatten(0, 1))
                x = y.reshape(*x.shape[:2], *y.shape[1:])
        x = x + self.rpe_lif(conv_bn(x, self.rpe_conv, self.rpe_bn))
        return x.flatten(-2).transpose(-1, -2).contiguous()  # (T, B, N, D)

    def bn_neuron_pairs(self) -> list:
        return list(zip(self.bns, self.lifs)) + [(self.rpe_bn, self.rpe_lif)]


class SpikingSelfAttention(nn.Module):
    def __init__(self, backend: str, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be a multiple of heads, got dim={dim}, heads={heads}")
        self.heads, self.scale = heads, 0.125  # Spikformer's fixed scale
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
        x = (q @ k.transpose(-2, -1)) @ v * self.scale
        x = self.attn_lif(x.transpose(2, 3).reshape(t, b, n, d).contiguous())
        return self.proj_lif(linear_bn(x, self.proj_linear, self.proj_bn))

    def bn_neuron_pairs(self) -> list:
        return [(getattr(self, f"{s}_bn"), getattr(self, f"{s}_lif")) for s in ("q", "k", "v", "proj")]


class MLP(nn.Module):
    def __init__(self, backend: str, dim: int, hidden: int):
        super().__init__()
        self.fc1_linear, self.fc1_bn, self.fc1_lif = nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), lif(backend)
        self.fc2_linear, self.fc2_bn, self.fc2_lif = nn.Linear(hidden, dim), nn.BatchNorm1d(dim), lif(backend)

    def forward(self, x):
        x = self.fc1_lif(linear_bn(x, self.fc1_linear, self.fc1_bn))
        return self.fc2_lif(linear_bn(x, self.fc2_linear, self.fc2_bn))

    def bn_neuron_pairs(self) -> list:
        return [(self.fc1_bn, self.fc1_lif), (self.fc2_bn, self.fc2_lif)]


class Block(nn.Module):
    def __init__(self, backend: str, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.attn, self.mlp = SpikingSelfAttention(backend, dim, heads), MLP(backend, dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Spikformer(nn.Module):
    """See the module docstring; ``backend`` for every neuron ('torch', 'cupy', 'temporal_fusion')."""

    def __init__(self, backend: str = "torch", in_channels: int = 3, num_classes: int = 10, dim: int = 64,
                 heads: int = 4, depth: int = 1, mlp_ratio: int = 4, stages: int = 4):
        super().__init__()
        self.patch_embed = PatchEmbedding(backend, in_channels, dim, stages)
        self.blocks = nn.ModuleList(Block(backend, dim, heads, mlp_ratio) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(2)).mean(0)


def fold_pairs(net: nn.Module) -> list:
    """Every (BatchNorm, neuron) pair of the Spikformer modules in ``net`` whose BatchNorm output
    goes to that neuron only (a Conv-BN2d-LIF or Linear-BN1d-LIF stack; the attention LIF has
    no BatchNorm)."""
    return [pair for m in net.modules() if hasattr(m, "bn_neuron_pairs") for pair in m.bn_neuron_pairs()]


def reset(net: nn.Module) -> None:
    """clock_driven's reset_net: every neuron's v back to v_reset, v_seq dropped."""
    from spikingjelly.clock_driven import functional
    functional.reset_net(net)
