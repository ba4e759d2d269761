"""Whole-network benchmark (sj_temporal_fusion/bench/net.py), on tiny sizes on the CPU."""
import json

import pytest
import torch

from sj_temporal_fusion.bench import net
from sj_temporal_fusion.bench.__main__ import main


@pytest.mark.slow  # three networks benchmarked
def test_cli_small(tmp_path):
    # Batch 2, not 1: with T * batch = 2 the BatchNorms at ResNet18's 1 x 1 layer4 normalise over
    # 2 values, whose gradient (invstd ~ 1 / |x1 - x2|) amplifies rounding past the first-step check.
    payload = main(["net", "--device", "cpu", "--T", "2", "--batch", "2", "--image-size", "16",
                    "--reps", "2", "--min-reps", "1", "--warmup", "0", "--out", str(tmp_path), "--quiet"])
    rows = {(r["mode"], r["method"]): r for r in json.loads((tmp_path / "net-cpu.json").read_text())["results"]}
    assert len(rows) == len(net.DEFAULT_METHODS) * len(net.MODES)
    assert "spikingjelly2" not in net.DEFAULT_METHODS  # SpikingJelly 2's own path, under 2.x only
    for mode in net.MODES:
        assert rows[(mode, "cupy")]["status"] == "skipped"
        for method in ("torch", "temporal_fusion", "temporal_fusion+spike_bits", "temporal_fusion+fold_bn"):
            r = rows[(mode, method)]
            assert r["status"] == "ok", r
            assert r["median_ms"] > 0 and r["peak_bytes"] > 0 and r["reps"] >= 1
            assert abs(sum(r[f"{c}_share"] for c in net.CATEGORIES) - 1) < 1e-6
            # Every model has convolutions, BatchNorms and neurons that take measurable time
            # (folded BatchNorms run inside the neuron's time).
            assert min(r["conv_ms"], r["neuron_ms"]) > 0, r
            assert r["bn_ms"] > 0 or method == "temporal_fusion+fold_bn", r
        assert rows[(mode, "torch")]["speedup_vs_torch"] == 1.0
    train = rows[("train", "temporal_fusion+spike_bits")]
    assert train["grad_bitwise_equal_to_temporal_fusion"] is True
    assert train["spike_bits_ms"] > 0  # packing ran, and was attributed to its own category
    assert rows[("train", "temporal_fusion")]["spike_bits_ms"] == 0
    assert rows[("train", "temporal_fusion")]["grad_rel_diff_vs_torch"] < 1e-4
    assert rows[("train", "temporal_fusion+fold_bn")]["grad_rel_diff_vs_torch"] < 1e-4
    assert (tmp_path / "net-cpu.png").exists() and (tmp_path / "net-cpu.csv").exists()
    assert payload["config"]["neuron"]["tau"] == 1.25


def test_models_and_first_convolution_channels():
    for model in [m for m in net.MODELS if m.startswith("resnet")]:  # the Spikformer: its own test
        m = net.build_model(model, "temporal_fusion", channels=1)
        assert m.conv1.in_channels == 1
        assert {n.backend for n in m.modules() if hasattr(n, "v_threshold")} == {"temporal_fusion"}


def test_breakdown_attributes_backward_to_the_forward_layer():
    # A network of one convolution only: its backward (ConvolutionBackward0) must land in conv,
    # which then holds most of the step; the neuron category stays empty.
    class OnlyConv(net.Setup):
        def __init__(self):
            self.method, self.mode, self.device = "x", "train", torch.device("cpu")
            self.net = torch.nn.Conv2d(3, 64, 5)
            self.x = torch.rand(16, 3, 48, 48, requires_grad=True)  # backward: grad input and weight
            self.loss = None

        def step(self):
            self.net.zero_grad(set_to_none=True)
            self.x.grad = None
            self.loss = self.net(self.x).sum()  # cheap outside the convolution, forward and backward
            self.loss.backward()
    parts = net.breakdown(OnlyConv())
    assert parts["neuron"] == 0 and parts["bn"] == 0
    assert parts["conv"] > 0.5 * sum(parts.values()), parts


class Fake:
    """A method whose gradient is ``scale`` times the right one."""
    def __init__(self, scale):
        self.p = torch.nn.Parameter(torch.ones(3))
        self.scale, self.loss = scale, None

    def step(self):
        self.p.grad = None
        self.loss = (self.p * self.scale).sum()
        self.loss.backward()

    def gradients(self):
        return {"p": self.p.grad.clone()}


def test_check_fails_a_method_with_wrong_gradients():
    result = net.check({"torch": Fake(1.0), "temporal_fusion": Fake(1.0), "temporal_fusion+spike_bits": Fake(1.5)},
                       "train")
    assert result["temporal_fusion"]["check_ok"] and result["temporal_fusion"]["grad_rel_diff_vs_torch"] == 0
    assert not result["temporal_fusion+spike_bits"]["check_ok"]
    assert result["temporal_fusion+spike_bits"]["grad_bitwise_equal_to_temporal_fusion"] is False


def test_check_bound_for_folded_batch_norm():
    # fold_bn may flip a spike within rounding of the threshold (see net.FOLD_GRAD_TOLERANCE):
    # its bound is wider, the other methods' is not, and an O(1) error fails both.
    ok = net.check({"torch": Fake(1.0), "temporal_fusion": Fake(1.005), "temporal_fusion+fold_bn": Fake(1.005)},
                   "train")
    assert not ok["temporal_fusion"]["check_ok"] and ok["temporal_fusion+fold_bn"]["check_ok"]
    wrong = net.check({"torch": Fake(1.0), "temporal_fusion+fold_bn": Fake(1.5)}, "train")
    assert not wrong["temporal_fusion+fold_bn"]["check_ok"]


def test_table_prints_skips():
    text = net.table([{"model": "resnet18", "mode": "train", "method": "cupy", "status": "skipped",
                       "reason": "no CUDA"}])
    assert "skipped: no CUDA" in text


def test_check_runs_the_first_step_deterministically_and_restores_the_settings():
    """cuDNN may pick a different, non-deterministic weight-gradient algorithm for each network:
    the first-step check (bitwise for spike bits) runs with deterministic algorithms only."""
    cudnn = torch.backends.cudnn
    seen = []

    class Probe:
        loss = torch.tensor(0.0)

        def step(self):
            seen.append((cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled()))

        def gradients(self):
            return {}
    before = (cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn.benchmark = True
    try:
        net.check({"temporal_fusion": Probe(), "temporal_fusion+spike_bits": Probe()}, "train")
        assert seen == [(True, False, True)] * 2
        assert (cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled()) == \
            (before[0], True, before[2])
    finally:
        cudnn.deterministic, cudnn.benchmark = before[0], before[1]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])


@pytest.mark.slow  # a network benchmarked
def test_cli_spikformer_small(tmp_path):
    """The Spikformer (clock_driven nodes, BatchNorms in forward code) beside the ResNets: every
    method runs and passes the first-step check; its neurons are profiled as neurons. (That
    fold_bn moves the BatchNorms' time into the neurons is the benchmark's to show, not a timed
    assertion's: under load it inverted.)"""
    main(["net", "--device", "cpu", "--models", "spikformer", "--modes", "train", "--T", "2", "--batch", "2",
          "--image-size", "16", "--dim", "16", "--heads", "2", "--reps", "1", "--min-reps", "1", "--warmup", "0",
          "--out", str(tmp_path), "--quiet", "--no-plots"])
    payload = json.loads((tmp_path / "net-cpu.json").read_text())
    rows = {r["method"]: r for r in payload["results"]}
    config = payload["config"]["spikformer"]
    assert config["dim"] == 16 and "attention LIF 0.5" in config["neuron"]
    assert rows["cupy"]["status"] == "skipped"
    for method in ("torch", "temporal_fusion", "temporal_fusion+spike_bits", "temporal_fusion+fold_bn"):
        r = rows[method]
        assert r["status"] == "ok" and r["model"] == "spikformer", r
        assert r["neuron_ms"] > 0 and r["conv_ms"] > 0 and r["peak_bytes"] > 0, r
        assert r["grad_rel_diff_vs_torch"] < 1e-4, r
    assert rows["temporal_fusion+spike_bits"]["grad_bitwise_equal_to_temporal_fusion"] is True
    assert rows["temporal_fusion+spike_bits"]["spike_bits_ms"] > 0


def test_spikformer_model_and_its_pairs():
    from spikingjelly.clock_driven import neuron as cd_neuron
    from sj_temporal_fusion.bench import spikformer
    from sj_temporal_fusion.optimize import fold_pairs
    m = net.build_model("spikformer", "temporal_fusion", channels=1, spikformer_size=dict(dim=32, depth=2, heads=4))
    nodes = [n for n in m.modules() if isinstance(n, cd_neuron.MultiStepLIFNode)]
    assert {n.backend for n in nodes} == {"temporal_fusion"} and m.patch_embed.convs[0].in_channels == 1
    assert sorted(n.v_threshold for n in nodes).count(0.5) == 2  # one attention LIF per block
    # Every BatchNorm is named in a pair, with the neuron it feeds; none can be found by pattern.
    pairs = spikformer.fold_pairs(m)
    bns = [b for b in m.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(pairs) == len(bns) == 4 + 1 + 2 * (4 + 2) and {id(b) for b, _ in pairs} == {id(b) for b in bns}
    assert fold_pairs(m) == []
    out = m(torch.rand(2, 3, 1, 16, 16))
    assert out.shape == (3, 10)
    with pytest.raises(ValueError, match="multiple of heads"):
        spikformer.Spikformer(dim=30, heads=4)
