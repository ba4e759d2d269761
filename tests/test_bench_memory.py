"""Peak memory of a training step (sj_temporal_fusion/bench/memory.py), on tiny sizes on the CPU."""
import json

import pytest
import torch

from sj_temporal_fusion.bench import lif, memory
from sj_temporal_fusion.bench.__main__ import main


def test_cpu_peak_counts_live_tensors():
    x = torch.randn(256, 256)

    def step():
        a = x * 2           # 256 KiB live
        b = a.exp()         # 512 KiB live
        del a
        return b.sum()      # a freed before b's reduction: the peak stays at two buffers
    peak = memory.peak_cpu(step)
    assert peak is not None
    assert 2 * 256 * 256 * 4 <= peak < 3 * 256 * 256 * 4


def test_fused_layer_needs_less_memory_than_the_torch_backend():
    # torch keeps h, the surrogate's input and a few masks per step for the backward; temporal
    # fusion keeps x and a checkpoint of v per 16 steps.
    T, N = 32, 4096
    peaks = {m: memory.measure(memory.setup_lif(m, torch.device("cpu"), torch.float32, T, N),
                               torch.device("cpu"))[0] for m in ("temporal_fusion", "torch")}
    assert peaks["temporal_fusion"] < 0.5 * peaks["torch"]
    # At least grad_x (T, N) is allocated in the step.
    assert peaks["temporal_fusion"] >= T * N * 4


def test_cli_small(tmp_path):
    payload = main(["memory", "--device", "cpu", "--T", "2", "--neurons", "1000", "--batch", "1",
                    "--image-size", "8", "--out", str(tmp_path), "--quiet"])
    rows = {(r["model"], r["method"]): r for r in json.loads((tmp_path / "memory-cpu.json").read_text())["results"]}
    assert len(rows) == 8
    assert rows[("lif", "cupy")]["status"] == "skipped"
    assert rows[("resnet18", "serial")]["status"] == "skipped"
    for key in [("lif", "temporal_fusion"), ("lif", "torch"), ("lif", "serial"),
                ("resnet18", "temporal_fusion"), ("resnet18", "torch")]:
        assert rows[key]["status"] == "ok" and rows[key]["peak_bytes"] > 0, rows[key]
    assert rows[("resnet18", "temporal_fusion")]["ratio_to_temporal_fusion"] == 1.0
    assert (tmp_path / "memory-cpu.png").exists()
    assert payload["config"]["lif_neuron"] == lif.FIG5


def test_resnet_neurons_really_switch_backend():
    from spikingjelly.activation_based import neuron
    step = memory.setup_resnet18("temporal_fusion", torch.device("cpu"), torch.float32, 2, 1, 8)
    backends = {m.backend for m in step.net.modules() if isinstance(m, neuron.LIFNode)}
    assert backends == {"temporal_fusion"}
    with pytest.raises(lif.Skip):
        memory.setup_resnet18("serial", torch.device("cpu"), torch.float32, 2, 1, 16)


def test_a_failing_case_is_an_error_row(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cupy backend exploded")
    monkeypatch.setattr(memory, "setup_resnet18", broken)
    payload = main(["memory", "--device", "cpu", "--models", "lif,resnet18", "--methods", "temporal_fusion",
                    "--T", "4", "--neurons", "512", "--out", str(tmp_path), "--quiet", "--no-plots"])
    data = json.loads((tmp_path / "memory-cpu.json").read_text())
    assert data["complete"] is True and data["results"] == json.loads(json.dumps(payload["results"]))
    rows = {r["model"]: r for r in data["results"]}
    assert rows["lif"]["status"] == "ok" and rows["lif"]["peak_bytes"] > 0
    assert rows["resnet18"] == {**rows["resnet18"], "status": "error", "reason": "RuntimeError: cupy backend exploded"}
