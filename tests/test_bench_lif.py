"""The benchmark CLI and its harness (sj_temporal_fusion/bench/lif.py, harness.py, tune.py), on
tiny sizes on the CPU: what it writes, that it checks before it times, and its arithmetic."""
import csv
import json

import pytest
import torch

from sj_temporal_fusion.bench import harness, lif, traffic
from sj_temporal_fusion.bench.__main__ import main


@pytest.fixture(scope="module")
def lif_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lif")
    payload = main(["lif", "--device", "cpu", "--neurons", "301", "--T", "2,17", "--dtypes", "fp32,bf16",
                    "--reps", "3", "--warmup", "1", "--max-seconds", "0.2", "--out", str(out), "--quiet"])
    return out, payload


@pytest.mark.slow  # a benchmark run in a subprocess
def test_cli_writes_json_csv_and_plots(lif_run):
    out, payload = lif_run
    data = json.loads((out / "lif-cpu.json").read_text())
    env = data["environment"]
    for key in ("device_name", "date_utc", "commit", "command", "torch_threads"):
        assert key in env
    assert env["versions"]["spikingjelly"] == "0.0.0.0.14"
    assert data["copy_bandwidth"]["gb_per_s"] > 0
    rows = data["results"]
    # 4 methods x 2 modes x 2 dtypes x 2 T
    assert len(rows) == 32
    with open(out / "lif-cpu.csv") as f:
        assert len(list(csv.DictReader(f))) == 32
    for name in ("lif-cpu_time.png", "lif-cpu_speedup.png", "lif-cpu_roofline.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # the benchmark run
def test_every_case_timed_or_explained(lif_run):
    _, payload = lif_run
    for r in payload["results"]:
        if r["method"] == "cupy":
            assert r["status"] == "skipped" and "CUDA" in r["reason"]
            continue
        assert r["status"] == "ok", r
        assert r["reps"] >= 3 and r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]
        assert r["spike_mismatch"] <= lif.SPIKE_TOLERANCE[harness.DTYPES[r["dtype"]]]
        assert r["design_bytes"] == traffic.step_traffic(r["mode"], r["T"], 301, harness.DTYPES[r["dtype"]], "lif").total
        assert r["gb_per_s"] == pytest.approx(r["design_bytes"] / r["median_ms"] * 1e-6)
        assert r["fraction_of_copy_bw"] == pytest.approx(r["gb_per_s"] / payload["copy_bandwidth"]["gb_per_s"])
        if r["mode"] == "train":
            assert r["grad_rel_error"] <= lif.GRAD_TOLERANCE[harness.DTYPES[r["dtype"]]]
    tf = [r for r in payload["results"] if r["method"] == "temporal_fusion"]
    assert all(r["speedup_of_temporal_fusion"] == 1.0 for r in tf)


def test_serial_baseline_is_spikingjelly_lif():
    from spikingjelly.activation_based import functional, neuron
    x = torch.randn(19, 257, dtype=torch.float64) * 0.5 + 0.3
    node = neuron.LIFNode(**lif.FIG5, surrogate_function=lif.surrogate(), step_mode="m")
    functional.reset_net(node)
    expected = node(x)
    got = lif.serial_lif(x, lif.FIG5["tau"], lif.FIG5["v_threshold"], lif.FIG5["v_reset"], lif.surrogate())
    assert torch.equal(got, expected)


def _case(mode="train", dtype=torch.float32):
    return lif.Case("temporal_fusion", mode, dtype, 9, 64, torch.device("cpu"))


def test_check_rejects_a_wrong_method():
    case = _case()
    x, grad = lif.make_inputs(case.T, case.N, case.dtype, case.device, case.mode)
    ref = lif.reference(x, grad)

    def wrong():  # spikes right, gradient wrong by a factor of two
        x.grad = None
        spike = lif.serial_lif(x, lif.FIG5["tau"], lif.FIG5["v_threshold"], lif.FIG5["v_reset"], lif.surrogate())
        spike.backward(2 * grad)
        return spike
    result = lif.check(wrong, case, x, grad, ref, case.N)
    assert not result["check_ok"] and "grad_x" in result["check_problems"][0]

    def shifted():
        with torch.no_grad():
            return (x > 0.0).to(x.dtype)
    assert not lif.check(shifted, _case("infer"), x, None, (ref[0], None), case.N)["check_ok"]


def test_check_accepts_temporal_fusion():
    case = _case()
    x, grad = lif.make_inputs(case.T, case.N, case.dtype, case.device, case.mode)
    step = lif.setup_temporal_fusion(case, x, grad)
    result = lif.check(step, case, x, grad, lif.reference(x, grad), case.N)
    assert result["check_ok"] and result["spike_mismatch"] == 0.0


def test_parse_and_quantiles():
    assert harness.parse_ints("2..512") == [2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert harness.parse_ints("3,5") == [3, 5]
    t = harness.Timing([4.0, 1.0, 3.0, 2.0])
    s = t.summary()
    assert (s["median_ms"], s["p25_ms"], s["p75_ms"], s["min_ms"], s["reps"]) == (2.5, 1.75, 3.25, 1.0, 4)
    with pytest.raises(SystemExit, match="choose from"):
        harness.parse_names("torch,jax", lif.METHODS, "method")


def test_time_fn_stops_at_the_time_budget():
    import time
    calls = []
    t = harness.time_fn(lambda: (calls.append(1), time.sleep(0.02)), torch.device("cpu"), warmup=1,
                        reps=100, max_seconds=0.05, min_reps=3)
    assert 3 <= len(t.samples_ms) < 10 and len(calls) == len(t.samples_ms) + 1


def test_cuda_asked_for_but_absent():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="--device cpu"):
        harness.resolve_device("cuda")


def test_tune_swaps_the_launch_shape_and_puts_it_back():
    from sj_temporal_fusion import _host
    from sj_temporal_fusion.bench import tune
    lanes = _host.LANES
    with tune.launch_shape(torch.device("cpu"), 1, 8):
        assert "-DTF_LANES=8" in _host._flags(False, False) and _host.LANES == 8
    assert _host.LANES == lanes and f"-DTF_LANES={lanes}" in _host._flags(False, False)


def test_a_failing_case_is_an_error_row_and_rows_are_written_as_they_finish(tmp_path, monkeypatch):
    """A case that raises (here: the launch error bench tune used to hit) becomes an error row,
    the other cases still run, and the JSON on disk holds every finished row even when the run is
    cut off before its end."""
    def broken(case, x, grad):
        def step():
            raise RuntimeError("CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: too many resources requested\nmore")
        return step
    monkeypatch.setitem(lif.SETUPS, "serial", broken)
    real_copy, calls = harness.copy_bandwidth, []

    def copy_then_cut_off(device, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the copy bandwidth after the last case: the run is cut off here
            raise KeyboardInterrupt
        return real_copy(device, nbytes=1 << 20, reps=3)
    monkeypatch.setattr(harness, "copy_bandwidth", copy_then_cut_off)
    with pytest.raises(KeyboardInterrupt):
        main(["lif", "--device", "cpu", "--neurons", "64", "--T", "2,3", "--dtypes", "fp32", "--modes", "infer",
              "--methods", "temporal_fusion,serial", "--reps", "3", "--warmup", "1", "--max-seconds", "0.1",
              "--no-flush", "--out", str(tmp_path), "--quiet", "--no-plots"])
    data = json.loads((tmp_path / "lif-cpu.json").read_text())
    assert data["complete"] is False
    rows = {(r["method"], r["T"]): r for r in data["results"]}
    assert len(rows) == 4
    for T in (2, 3):
        assert rows["temporal_fusion", T]["status"] == "ok"
        assert rows["serial", T]["status"] == "error"
        assert rows["serial", T]["reason"] == "RuntimeError: CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: too many resources requested"
    with open(tmp_path / "lif-cpu.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_flush_size_follows_the_last_level_cache(tmp_path, monkeypatch):
    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "491520K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert harness.cpu_last_level_cache_bytes(str(tmp_path)) == 480 << 20
    assert harness.cpu_last_level_cache_bytes(str(tmp_path / "absent")) == 32 << 20
    monkeypatch.setattr(harness, "cpu_last_level_cache_bytes", lambda: 480 << 20)
    assert harness.flush_bytes(torch.device("cpu")) == 960 << 20
    monkeypatch.setattr(harness, "cpu_last_level_cache_bytes", lambda: 8 << 20)
    assert harness.flush_bytes(torch.device("cpu")) == 64 << 20  # at least 64 MiB


def test_timing_reports_wall_time_and_flush_reads():
    device = torch.device("cpu")
    flush = harness.CacheFlusher(device)
    before = flush.buffer.clone()
    t = harness.time_fn(lambda: torch.ones(1000).sum(), device, warmup=1, reps=4, max_seconds=10, flush=flush)
    assert len(t.samples_ms) == len(t.wall_samples_ms) == 4
    assert t.summary()["wall_median_ms"] > 0
    assert torch.equal(flush.buffer, before)  # read, not written


@pytest.mark.slow  # a benchmark run
def test_grad_sum_and_the_other_generations_method(tmp_path):
    """--grad sum: the dL/dspike that spike.sum() passes (a 1 expanded to (T, N)), checked against
    the fp64 reference as a random one is; under 0.0.0.0.14 method spikingjelly2 is skipped, saying why."""
    payload = main(["lif", "--device", "cpu", "--neurons", "301", "--T", "17", "--dtypes", "fp32", "--modes", "train",
                    "--methods", "temporal_fusion,serial,spikingjelly2", "--grad", "sum", "--reps", "3", "--warmup",
                    "1", "--max-seconds", "0.1", "--no-flush", "--out", str(tmp_path), "--quiet", "--no-plots"])
    rows = {r["method"]: r for r in payload["results"]}
    for method in ("temporal_fusion", "serial"):
        assert rows[method]["status"] == "ok" and rows[method]["grad_rel_error"] < 1e-5, rows[method]
    assert rows["spikingjelly2"]["status"] == "skipped" and "needs spikingjelly 2.x" in rows["spikingjelly2"]["reason"]
    assert payload["config"]["grad"] == "sum"
    x, grad = lif.make_inputs(4, 5, torch.float32, torch.device("cpu"), "train", grad_kind="sum")
    assert grad.shape == (4, 5) and grad.stride() == (0, 0) and bool((grad == 1).all())
