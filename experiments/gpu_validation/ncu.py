"""Nsight Compute for ./dev gpu: which kernels it profiles, the workload, its CSV."""
from __future__ import annotations

import csv
import io

import torch

METRICS = ("dram__throughput.avg.pct_of_peak_sustained_elapsed",
           "sm__warps_active.avg.pct_of_peak_sustained_active")


def kernel_names() -> tuple[str, ...]:
    """Our kernels' names, taken from the variant names the launcher uses (``variants.py``), so
    the profiler's filter follows a rename."""
    from sj_temporal_fusion.neurons import REGISTRY
    from sj_temporal_fusion.surrogate import DEFAULT_ID
    from sj_temporal_fusion.variants import backward_variant, fixup_variant, forward_variant
    m = next(m for m in REGISTRY.values() if m.shardable)  # one with all three kernels
    f32, form = torch.float32, m.forms[0]
    variants = (forward_variant(m, f32, form), backward_variant(m, f32, DEFAULT_ID, form, False),
                fixup_variant(m, f32, form))
    return tuple(dict.fromkeys(v.split("<", 1)[0] for v in variants))


def kernel_filter() -> str:
    """``ncu --kernel-name`` value matching each of our kernels (any template arguments)."""
    return "regex:" + "|".join(kernel_names())


def workload(neurons: int) -> str:
    """Python code that runs the LIF layer forward and backward at T = 32 in fp32, bf16, fp16."""
    return f"""
import torch, sj_temporal_fusion
from spikingjelly.activation_based import surrogate
x0 = torch.randn(32, {int(neurons)}, device="cuda") * 0.5 + 0.3
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = x0.to(dtype).requires_grad_()
    s = sj_temporal_fusion.lif_multi_step(x, tau=1.25, decay_input=False, v_threshold=0.3,
                                          surrogate_function=surrogate.Sigmoid(alpha=4.0))[0]
    s.backward(torch.ones_like(s))
torch.cuda.synchronize()
"""


def parse_csv(text: str) -> list[dict]:
    """(kernel, metric, value, unit) rows from ``ncu --csv`` output mixed with program output."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    if not lines:
        return []
    out = []
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        if row.get("Metric Name") in METRICS:
            out.append({"kernel": row.get("Kernel Name", ""), "metric": row["Metric Name"],
                        "value": row.get("Metric Value", ""), "unit": row.get("Metric Unit", "")})
    return out
