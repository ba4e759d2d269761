"""Byte accounting of the kernels (sj_temporal_fusion/bench/traffic.py): the host build's counting
variant must move exactly the bytes of the design, for every variant, so a kernel change that
adds global-memory traffic fails here."""
import pytest
import torch

from sj_temporal_fusion import ops
from sj_temporal_fusion.bench import traffic

# Odd sizes: T = 37 is not a multiple of the 16-step checkpoint chunk (3 checkpoints, the last one
# partial), N = 131 = 2 * 64 + 3 leaves a partial lane group in the host build.
T, N = 37, 131
VARIANTS = list(traffic.variants())


def _id(v):
    extra = [name for name in ("store_v_seq", "grad_v_seq", "grad_v_last") if v[name]]
    return "-".join([v["pass_"], v["dtype"], v["kind"]] + extra)


@pytest.mark.parametrize("variant", VARIANTS, ids=[_id(v) for v in VARIANTS])
def test_counted_bytes_equal_design(variant):
    counted, design = traffic.measure_variant(variant, T, N)
    assert counted == design, (
        f"{_id(variant)}: the kernel moved {counted} bytes, the design says {design} "
        f"({counted.total / (T * N):.3f} vs {design.total / (T * N):.3f} bytes per neuron-step)")


def test_variants_cover_the_matrix():
    # dtypes x (forward-infer, forward-train) x store_v_seq x PLIF, and backward x grad_v_seq x
    # grad_v_last x PLIF: 4 * 2 * (4 + 4) = 64.
    assert len(VARIANTS) == 64
    assert {v["dtype"] for v in VARIANTS} == {"fp32", "fp16", "bf16", "fp64"}


@pytest.mark.parametrize("dtype,infer,train", [
    (torch.float32, 8.0, 20.5), (torch.float16, 4.0, 10.5), (torch.bfloat16, 4.0, 10.5),
    (torch.float64, 16.0, 41.0)])
def test_design_bytes_per_neuron_step(dtype, infer, train):
    # Inference: read x, write spike. Training: 2 + 3 words and a 4-byte (fp64: 8) checkpoint
    # written and read once per 16 steps.
    assert traffic.words_per_neuron_step("infer", dtype) == infer
    assert traffic.words_per_neuron_step("train", dtype) == train
    # The exact model tends to it: per-neuron O(1) terms vanish as T grows, and at T = 16 * m
    # the checkpoints are exact.
    big_t = 16 * 4096
    for mode, want in (("infer", infer), ("train", train)):
        got = traffic.step_traffic(mode, big_t, 7, dtype).total / (big_t * 7)
        assert got == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_public_path_moves_the_roofline_bytes(mode):
    # What bench.lif divides by: functional.lif_multi_step (+ autograd backward for 'train').
    counted = traffic.count_step(mode, T, N, torch.float32)
    assert counted == traffic.step_traffic(mode, T, N, torch.float32)


def test_counting_sees_an_extra_word():
    # The accounting can fail: store_v_seq adds exactly one written word per neuron-step.
    plain = traffic.count_forward(T, N, torch.float32, train=False)
    with_v = traffic.count_forward(T, N, torch.float32, train=False, store_v_seq=True)
    assert with_v.written - plain.written == T * N * 4
    assert with_v.read == plain.read


def test_counting_restores_the_launcher():
    from sj_temporal_fusion import _host
    before = _host.launch
    with traffic.counting():
        assert _host.launch is not before
    assert _host.launch is before


def test_unused_v_seq_costs_no_backward_traffic():
    from sj_temporal_fusion import functional
    x = torch.randn(T, N, requires_grad=True)
    spike, _, v_seq = functional.lif_multi_step(x, tau=1.25, decay_input=False, v_threshold=0.3,
                                                store_v_seq=True)
    assert v_seq is not None
    with traffic.counting() as launches:
        spike.sum().backward()
    (entry, counted), = launches
    assert entry == "tf_lif_backward"
    assert counted.read <= traffic.backward_traffic(T, N, torch.float32, grad_v_last=True).read


def test_checkpoint_interval_matches_the_kernel():
    from sj_temporal_fusion import _host
    assert _host.library().tf_chunk() == ops.CHUNK
