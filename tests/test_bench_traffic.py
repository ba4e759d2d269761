"""Byte accounting of the kernels (sj_temporal_fusion/bench/traffic.py): the host build's counting
variant must move exactly the bytes of the design, for every variant, so a kernel change that
adds global-memory traffic fails here."""
import pytest
import torch

from sj_temporal_fusion.bench import harness, traffic
from sj_temporal_fusion.surrogate import DEFAULT_ID
from sj_temporal_fusion.variants import backward_variant, forward_variant
from sj_temporal_fusion.neurons import REGISTRY

# Odd sizes: T = 37 is not a multiple of the 16- or 8-step checkpoint chunk (the last one
# partial), N = 131 = 2 * 64 + 3 leaves a partial lane group in the host build.
T, N = 37, 131
VARIANTS = list(traffic.variants())


def _id(v):
    extra = [name for name in ("store_v_seq", "grad_v_seq", "grad_state_last", "learnable", "fold_bn") if v[name]]
    return "-".join([v["model"], v["pass_"], v["dtype"]] + extra)


def kernel_variants(item):
    """The host variants a counted pass launches (tests/_prebuild.py): the counting build of the
    measured kernel, and for a backward the plain forward that makes its checkpoints."""
    v = item.callspec.params.get("variant")
    if v is None:
        return None
    dtype = harness.DTYPES[v["dtype"]]
    m, o, _, mask = traffic._layer(v["model"], dtype, v["learnable"])
    forward = forward_variant(m, dtype, m.forward_form(o), v["fold_bn"])
    if v["pass_"] != "backward":
        return [(forward, False, True)]
    return [(forward, False, False),
            (backward_variant(m, dtype, DEFAULT_ID, m.form(o), mask != 0, v["fold_bn"]), False, True)]


@pytest.mark.parametrize("variant", VARIANTS, ids=[_id(v) for v in VARIANTS])
def test_counted_bytes_equal_design(variant):
    counted, design = traffic.measure_variant(variant, T, N)
    assert counted == design, (
        f"{_id(variant)}: the kernel moved {counted} bytes, the design says {design} "
        f"({counted.total / (T * N):.3f} vs {design.total / (T * N):.3f} bytes per neuron-step)")


def test_variants_cover_every_model():
    # Per model and dtype: (forward-infer, forward-train) x store_v_seq, and backward x grad_v_seq x
    # (no final-state gradient, final-state gradients, final-state gradients + learnable parameters);
    # every dtype for one model, fp32 and bf16 for the others.
    every = traffic.EVERY_DTYPE_MODEL
    assert every in REGISTRY
    assert {v["dtype"] for v in VARIANTS if v["model"] == every} == {"fp32", "fp16", "bf16", "fp64"}
    plain = [v for v in VARIANTS if not v["fold_bn"]]
    assert {v["model"] for v in plain} == set(REGISTRY)
    assert len(plain) == 10 * (4 + 2 * (len(REGISTRY) - 1))
    # BatchNorm folded: forward-infer, forward-train and the backward with every gradient, per model
    # in fp32 and for that model in every dtype.
    folded = [v for v in VARIANTS if v["fold_bn"]]
    assert {v["model"] for v in folded} == set(REGISTRY)
    assert len(folded) == 3 * (len(REGISTRY) - 1 + 4)


@pytest.mark.parametrize("model", list(REGISTRY))
def test_learnable_layer_learns(model):
    # The learnable variants differ from the plain ones: their layer learns at least one parameter.
    assert traffic._layer(model, torch.float32, False)[3] == 0
    assert traffic._layer(model, torch.float32, True)[3] != 0


# Bytes per neuron-step in the long-T limit: the numbers the README and bench/traffic.py state.
BYTES_PER_NEURON_STEP = {
    ("lif", torch.float32): (8.0, 20.5), ("lif", torch.float16): (4.0, 10.5), ("lif", torch.bfloat16): (4.0, 10.5),
    ("lif", torch.float64): (16.0, 41.0), ("qif", torch.float32): (8.0, 20.5), ("eif", torch.float32): (8.0, 20.5),
    ("klif", torch.float32): (8.0, 21.0), ("izhikevich", torch.float32): (8.0, 22.0),
    ("izhikevich", torch.bfloat16): (4.0, 12.0)}


def test_stated_bytes_per_neuron_step():
    # Inference: read x, write spike. Training: 2 + 3 words and a checkpoint of the S state
    # variables (4 bytes each, fp64: 8) written and read once per chunk (16 steps, 8 for KLIF and
    # Izhikevich). Not a parametrization over the models: a new model need not be stated here
    # (test_design_tends_to_bytes_per_neuron_step and the counted bytes cover it).
    for (model, dtype), (infer, train) in BYTES_PER_NEURON_STEP.items():
        assert traffic.words_per_neuron_step("infer", dtype, model) == infer, (model, dtype)
        assert traffic.words_per_neuron_step("train", dtype, model) == train, (model, dtype)


@pytest.mark.parametrize("model", list(REGISTRY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_design_tends_to_bytes_per_neuron_step(model, dtype):
    # The exact model tends to the long-T limit: per-neuron O(1) terms vanish as T grows, and at
    # T = 16 * m the checkpoints are exact.
    big_t = 16 * 4096
    for mode in ("infer", "train"):
        got = traffic.step_traffic(mode, big_t, 7, dtype, model).total / (big_t * 7)
        assert got == pytest.approx(traffic.words_per_neuron_step(mode, dtype, model), rel=1e-3)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_public_path_moves_the_roofline_bytes(mode):
    # What bench.lif divides by: functional.lif_multi_step (+ autograd backward for 'train').
    counted = traffic.count_step(mode, T, N, torch.float32)
    assert counted == traffic.step_traffic(mode, T, N, torch.float32, "lif")


def test_counting_sees_an_extra_word():
    # The accounting can fail: store_v_seq adds exactly one written word per neuron-step.
    plain = traffic.count_forward(T, N, torch.float32, model="lif", train=False)
    with_v = traffic.count_forward(T, N, torch.float32, model="lif", train=False, store_v_seq=True)
    assert with_v.written - plain.written == T * N * 4
    assert with_v.read == plain.read


def test_folding_adds_only_the_per_channel_reads():
    # Folded BatchNorm: x (its input) is read where its output would have been; per neuron, one
    # scale and one shift read, forward and backward; nothing is written that was not before.
    for train in (False, True):
        plain = traffic.count_forward(T, N, torch.float32, model="lif", train=train)
        fold = traffic.count_forward(T, N, torch.float32, model="lif", train=train, fold_bn=True)
        assert fold.written == plain.written
        assert fold.read - plain.read == 2 * N * 4
    plain = traffic.count_backward(T, N, torch.float32, model="lif")
    fold = traffic.count_backward(T, N, torch.float32, model="lif", fold_bn=True)
    assert (fold.read - plain.read, fold.written - plain.written) == (2 * N * 4, 0)


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
    (kernel, counted), = launches
    assert kernel == "neuron_backward"
    assert counted.read <= traffic.backward_traffic(T, N, torch.float32, model="lif", grad_state_last=1).read


@pytest.mark.parametrize("model", list(REGISTRY))
def test_checkpoint_interval_matches_the_header(model):
    from pathlib import Path
    import sj_temporal_fusion
    header = (Path(sj_temporal_fusion.__file__).parent / "csrc" / "neurons" / f"{model}.cuh").read_text()
    assert f"CHUNK = {REGISTRY[model].chunk}," in header
