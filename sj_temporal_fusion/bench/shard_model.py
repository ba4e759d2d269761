"""Speedup models for time sharding (used by ``bench shard`` only, so they live beside it): the paper's Eq. (5) (Fig. 4) and a prediction of its Fig. 6
(time of one 1M-neuron LIF layer against GPU count) for the algorithm implemented here.

Nothing in this module is measured. ``predict`` combines
  * fix-up lengths measured by ``python -m sj_temporal_fusion.bench shard`` (they are a property
    of the dynamics and the inputs, bitwise the same on CPU and GPU, so a CPU measurement holds);
  * kernel times: measured on a GPU when a bench result from one is given, else modelled as the
    bytes each kernel must move over a stated HBM bandwidth plus a launch overhead;
  * the link: a stated NCCL point-to-point latency and bandwidth (``Hardware``).
Every figure drawn from it says "modelled".
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional


def eq5_speedup(k, Ts: float, Tc: float):
    """Eq. (5): mu = k Ts / (k (k - 1) Tc + Ts), for Ts the one-GPU time and Tc one transfer."""
    return k * Ts / (k * (k - 1) * Tc + Ts)


def eq5_best_k(Ts: float, Tc: float) -> float:
    """The k that maximises Eq. (5) as a continuous function: sqrt(Ts / Tc)."""
    return math.sqrt(Ts / Tc)


@dataclass(frozen=True)
class Hardware:
    """Stated, not measured: an 8-GPU A100 SXM node as in the paper's Sec. 5.4."""
    name: str = "A100-SXM4 80GB x8, NVLink 3 (stated figures)"
    hbm_bytes_per_s: float = 1.6e12      # ~80 % of the 2.04 TB/s peak, what streaming kernels reach
    launch_s: float = 5e-6               # kernel launch + tail
    step_latency_s: float = 0.6e-6       # one dependent step of a lone thread (a DRAM load round trip)
    link_latency_s: float = 12e-6        # NCCL send/recv of a small message between two GPUs
    link_bytes_per_s: float = 150e9      # NCCL p2p over NVLink 3 (300 GB/s per direction peak)
    state_bytes: int = 4                 # fp32 state per neuron


@dataclass(frozen=True)
class Fixup:
    """Fix-up lengths over the neurons of one slice boundary (from bench shard)."""
    mean: float          # steps re-run per neuron
    warp_max_mean: float  # mean over groups of 32 neurons of their longest fix-up (a warp's time)
    max: float           # the longest fix-up: the tail that sets the kernel's duration

    def clipped(self, T_local: int) -> "Fixup":
        return Fixup(min(self.mean, T_local), min(self.warp_max_mean, T_local), min(self.max, T_local))


def slice_time(N: int, T: int, hw: Hardware, *, bytes_per_step: float = 8.0) -> float:
    """Fused forward over T steps: read x, write the spike (fp32: 8 bytes per neuron-step)."""
    return hw.launch_s + N * T * bytes_per_step / hw.hbm_bytes_per_s


def fixup_time(N: int, fix: Fixup, hw: Hardware) -> float:
    """A warp works until its longest neuron matches, moving x and the spike (8 bytes) and, for
    the recomputed speculative run, nothing more; the last warp's chain of dependent steps bounds
    it from below."""
    traffic = N * (fix.warp_max_mean + 1) * 8.0 / hw.hbm_bytes_per_s
    return hw.launch_s + max(traffic, (fix.max + 1) * hw.step_latency_s)


def hop_time(N: int, hw: Hardware, words: int = 1) -> float:
    return hw.link_latency_s + words * N * hw.state_bytes / hw.link_bytes_per_s


def predict(N: int, T: int, k: int, fix: Fixup, hw: Hardware = Hardware(), training: bool = False) -> dict:
    """Modelled seconds on k GPUs (and on one) for one layer: the forward's critical path is rank
    0's slice, then k - 1 hops each followed by a fix-up; training adds the backward, whose
    critical path is the light pass, 1 + ceil(log2(k - 1)) scan hops of (A, B), the final pass."""
    Tj = math.ceil(T / k)
    one_fwd = slice_time(N, T, hw, bytes_per_step=8.0 + (4.0 / 16 if training else 0.0))
    fwd = one_fwd  # one rank: no speculation, no checkpoints beyond training's
    if k > 1:  # speculative slices keep fp32 checkpoints every 16 steps for the fix-up
        fwd = slice_time(N, Tj, hw, bytes_per_step=8.0 + 4.0 / 16)
        fwd += (k - 1) * (hop_time(N, hw) + fixup_time(N, fix.clipped(Tj), hw))
    out = dict(k=k, T=T, N=N, forward_s=fwd, one_gpu_forward_s=one_fwd)
    if training:
        # backward: read x, grad_spike, write grad_x (12 B/step); the light pass skips grad_x (8 B)
        one_bwd = hw.launch_s + N * T * 12.0 / hw.hbm_bytes_per_s
        bwd = hw.launch_s + N * Tj * 12.0 / hw.hbm_bytes_per_s
        if k > 1:
            hops = 1 + (math.ceil(math.log2(k - 1)) if k > 2 else 0)
            compose = hw.launch_s + N * 6 * hw.state_bytes / hw.hbm_bytes_per_s
            bwd += hw.launch_s + N * Tj * 8.0 / hw.hbm_bytes_per_s + hops * (hop_time(N, hw, 2) + compose)
        out.update(backward_s=bwd, one_gpu_backward_s=one_bwd)
    return out


def fig4(path, ratios=(1e2, 1e3, 1e4), k_max: int = 32) -> None:
    """Eq. (5) against k for three Ts/Tc ratios, optimum marked (the paper's missing Fig. 4)."""
    from . import harness
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ks = list(range(1, k_max + 1))
    for r in ratios:
        mu = [eq5_speedup(k, r, 1.0) for k in ks]
        line, = ax.plot(ks, mu, marker=".", label=f"$T_s/T_c$ = {r:g}")
        kb = eq5_best_k(r, 1.0)
        if kb <= k_max:
            ax.plot([kb], [eq5_speedup(kb, r, 1.0)], "x", color=line.get_color())
    ax.set_xlabel("GPU count k")
    ax.set_ylabel(r"speedup $\mu$ (Eq. 5)")
    ax.set_title("Eq. (5), modelled; x: optimum $k=\\sqrt{T_s/T_c}$", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def fig6(path, fix: Fixup, hw: Hardware = Hardware(), N: int = 1_000_000,
         Ts=(8, 16, 32, 64, 128, 256, 512, 1024), ks=range(1, 9), source: str = "") -> list[dict]:
    """Modelled time of one LIF layer against GPU count for each T (forward, and forward +
    backward), from measured fix-up lengths and the stated ``hw``. Returns the points."""
    from . import harness
    plt = harness.pyplot()
    rows = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for T in Ts:
        fwd, train = [], []
        for k in ks:
            if k > T:
                continue
            p = predict(N, T, k, fix, hw, training=True)
            q = predict(N, T, k, fix, hw, training=False)
            rows.append(dict(T=T, k=k, forward_ms=q["forward_s"] * 1e3,
                             train_ms=(p["forward_s"] + p["backward_s"]) * 1e3,
                             speedup_forward=q["one_gpu_forward_s"] / q["forward_s"],
                             speedup_train=(p["one_gpu_forward_s"] + p["one_gpu_backward_s"])
                             / (p["forward_s"] + p["backward_s"])))
            fwd.append((k, rows[-1]["forward_ms"]))
            train.append((k, rows[-1]["train_ms"]))
        axes[0].plot(*zip(*fwd), marker=".", label=f"T={T}")
        axes[1].plot(*zip(*train), marker=".", label=f"T={T}")
    for ax, what in zip(axes, ("forward (inference)", "forward + backward (training)")):
        ax.set_yscale("log")
        ax.set_xlabel("GPU count k")
        ax.set_ylabel("time per layer call (ms), modelled")
        ax.set_title(f"{what}, N = {N:,} LIF neurons", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"MODELLED, not measured: {hw.name}\nfix-up lengths measured ({source}): "
                 f"mean {fix.mean:.1f}, warp-max mean {fix.warp_max_mean:.1f}, max {fix.max:.0f} steps",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return rows


def hardware_dict(hw: Optional[Hardware] = None) -> dict:
    return asdict(hw or Hardware())
