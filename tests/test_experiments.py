"""The Table 1 pipeline on the CPU: configs, data and encoding, tiny training runs of every
architecture on every available backend, the table built from them, and torchrun with two gloo
processes reproducing one process."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (unlike `python -m pytest`) does not add the root
    sys.path.insert(0, str(ROOT))

import sj_temporal_fusion.frontends.activation_based as sj_hook  # noqa: E402
from experiments import config as configs, data, report, table1, train  # noqa: E402

ARCHS = configs.ARCHS
LIF_NODES = {"spiking_resnet18": 17, "spiking_resnet34": 33, "spiking_resnet50": 49}
CUPY_OK = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
CUPY_SKIP = ("SpikingJelly's cupy backend needs a CUDA device and CuPy; this machine has "
             + ("no CUDA device" if not torch.cuda.is_available() else "no CuPy"))
BACKENDS = [pytest.param("torch"), pytest.param("temporal_fusion"),
            pytest.param("cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUPY_OK, reason=CUPY_SKIP)])]
TINY = ["--set", "T=4", "--set", "batch_size=4", "--set", "num_workers=0", "--no-progress"]
DEVICE = {"torch": "cpu", "temporal_fusion": "cpu", "cupy": "cuda"}  # the CPU where possible


# ---------------------------------------------------------------- configs

def test_every_table1_cell_parses_with_the_papers_settings():
    cells = configs.cell_configs()
    resolved = [configs.load(path) for path in cells]
    assert {(c["dataset"], c["arch"]) for c in resolved} == {
        (d, a) for d in ("mnist", "cifar10", "nmnist", "dvs128_gesture") for a in ARCHS}
    for path, c in zip(cells, resolved):
        raw = yaml.safe_load(path.read_text())
        assert set(raw) == {"inherit", "dataset", "arch", "batch_size"}, path  # the rest inherits
        assert c["batch_size"] == (10 if c["dataset"] == "dvs128_gesture" else 100), path
        assert (c["T"], c["epochs"], c["lr"], c["repeats"]) == (32, 5, 1e-3, 3)
        assert 1 - 1 / c["tau"] == pytest.approx(0.2)  # the paper's k_tau
        neuron = (c["decay_input"], c["v_threshold"], c["v_reset"], c["surrogate_alpha"])
        assert neuron == (False, 0.3, 0.0, 4.0)
        encoding = (c["static_encoding"], c["event_split_by"], c["dtype"], c["amp"])
        assert encoding == ("poisson", "number", "float32", "off")
        assert c["name"] == path.stem and set(c) == {"name"} | set(configs.SCHEMA)


def test_every_config_file_parses():
    for path in sorted(configs.CONFIG_DIR.rglob("*.yaml")):
        if path.name != "base.yaml":
            configs.load(path)


def test_base_yaml_holds_every_shared_key_and_every_key_is_documented():
    base = yaml.safe_load((configs.CONFIG_DIR / "base.yaml").read_text())
    assert set(base) == set(configs.SCHEMA) - {"dataset", "arch", "batch_size"}
    described = configs.describe()
    for key, spec in configs.SCHEMA.items():
        assert len(spec.doc) > 20 and re.search(rf"^  {key} +\S", described, flags=re.M), key


def _cell(tmp_path, body: str) -> Path:
    """A cell file inheriting the real base.yaml (a YAML list body stays a bare list)."""
    path = tmp_path / "cell.yaml"
    path.write_text(body if body.startswith("-") else f"inherit: {configs.CONFIG_DIR / 'base.yaml'}\n" + body)
    return path


CELL_KEYS = "dataset: mnist\narch: spiking_resnet18\nbatch_size: 100\n"


@pytest.mark.parametrize("body, message", [
    (CELL_KEYS + "lr_rate: 0.1\n", r"unknown key 'lr_rate'; did you mean 'lr'"),
    ("dataset: mnist\narch: spiking_resnet18\nbatch_size: 0\n", r"batch_size must be an integer >= 1, got 0"),
    (CELL_KEYS + "T: 4.5\n", r"T must be an integer >= 1, got 4.5"),
    ("dataset: mnist\narch: resnet18\nbatch_size: 100\n", r"arch must be one of spiking_resnet18"),
    ("dataset: imagenet\narch: spiking_resnet18\nbatch_size: 100\n", r"dataset must be one of mnist"),
    (CELL_KEYS + "lr: -1\n", r"lr must be > 0"),
    (CELL_KEYS + "tau: 1.0\n", r"tau must be > 1"),
    (CELL_KEYS + "v_reset: zero\n", r"v_reset must be a number"),
    (CELL_KEYS + "amp: fp8\n", r"amp must be one of off, fp16, bf16"),
    (CELL_KEYS + "device: gpu\n", r"device must be auto, cpu, cuda"),
    (CELL_KEYS + "dtype: float64\namp: bf16\n", r"use amp: off with float64"),
    ("dataset: synthetic\narch: spiking_resnet18\nbatch_size: 100\n", r"needs synthetic_like"),
    ("arch: spiking_resnet18\nbatch_size: 100\n", r"missing keys dataset"),
    ("- a list\n", r"must be a mapping"),
])
def test_a_bad_config_is_a_clear_error(tmp_path, body, message):
    with pytest.raises(configs.ConfigError, match=message):
        configs.load(_cell(tmp_path, body))


def test_inheritance_errors_name_the_files(tmp_path):
    missing = tmp_path / "a.yaml"
    missing.write_text("inherit: nowhere.yaml\n")
    with pytest.raises(configs.ConfigError, match=r"nowhere.yaml not found \(inherited by .*a.yaml\)"):
        configs.load(missing)
    (tmp_path / "b.yaml").write_text("inherit: c.yaml\n")
    (tmp_path / "c.yaml").write_text("inherit: b.yaml\n")
    with pytest.raises(configs.ConfigError, match="inherit loop"):
        configs.load(tmp_path / "b.yaml")


def test_overrides_are_checked_and_synthetic_keeps_the_cells_shape():
    cell = configs.CONFIG_DIR / "cifar10_resnet34.yaml"
    c = configs.load(cell, {"dataset": "synthetic", "epochs": 1, "amp": False})
    assert (c["dataset"], c["synthetic_like"], c["epochs"], c["amp"]) == ("synthetic", "cifar10", 1, "off")
    assert data.spec_of(c).shape == (3, 32, 32)
    with pytest.raises(configs.ConfigError, match="override: repeats must be an integer >= 1, got 0"):
        configs.load(cell, {"repeats": 0})
    with pytest.raises(SystemExit):  # argparse error: exit status 2 with the message on stderr
        train.main(["--config", str(cell), "--set", "T=zero"])


# ---------------------------------------------------------------- data and encoding

def test_digits_are_mnist_shaped_and_split_stratified():
    train_set, test_set = data.digits()
    spec = data.SPECS["digits"]
    assert (len(train_set), len(test_set)) == (spec.train_size, spec.test_size)
    x, y = train_set.tensors
    assert x.shape[1:] == (1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    assert x[:, :, :4].abs().sum() == 0 and x[:, :, -4:].abs().sum() == 0  # MNIST-like margin
    counts = torch.bincount(test_set.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 360 test samples, ~36 per class


def test_shard_sampler_batches_of_all_ranks_make_the_one_process_batches():
    for size, batch, drop_last in ((103, 8, True), (103, 8, False), (9, 4, False)):
        single = data.ShardSampler(size, batch, 1, 0, shuffle=drop_last, drop_last=drop_last, seed=5)
        ranks = [data.ShardSampler(size, batch, 2, r, shuffle=drop_last, drop_last=drop_last, seed=5)
                 for r in range(2)]
        for s in [single] + ranks:
            s.set_epoch(3)
        order = list(single)
        shards = [list(r) for r in ranks]
        for i in range(single.global_batches()):
            local = [shard[i * batch // 2:(i + 1) * batch // 2] for shard in shards]
            assert sorted(local[0] + local[1]) == sorted(order[i * batch:(i + 1) * batch])
        assert len(order) == (size // batch * batch if drop_last else size)
        assert len(set(order)) == len(order)


def test_poisson_encoding_fires_at_the_pixel_rate_and_ignores_the_process_count():
    spec = data.SPECS["mnist"]
    x = torch.rand(6, 1, 28, 28)
    one = data.Encoder(spec, 200, "poisson", torch.device("cpu"))
    one.reseed(7)
    spikes = one(x, 6)
    assert spikes.shape == (200, 6, 3, 28, 28) and set(spikes.unique().tolist()) <= {0.0, 1.0}
    rate = spikes.mean(0)
    assert (rate - x.expand(-1, 3, -1, -1)).abs().max() < 0.15  # 200 draws: 4.3 sigma at p=0.5
    assert not torch.equal(spikes[:, :, 0], spikes[:, :, 1])  # channels drawn independently
    parts = []
    for rank in range(2):
        enc = data.Encoder(spec, 200, "poisson", torch.device("cpu"), world=2, rank=rank)
        enc.reseed(7)
        parts.append(enc(x[rank::2], 6))
    assert torch.equal(parts[0], spikes[:, 0::2]) and torch.equal(parts[1], spikes[:, 1::2])
    direct = data.Encoder(spec, 3, "direct", torch.device("cpu"))(x, 6)
    assert torch.equal(direct, x.expand(-1, 3, -1, -1).unsqueeze(0).expand(3, -1, -1, -1, -1))


def test_event_frames_become_time_major_with_a_zero_third_channel():
    spec = data.SPECS["nmnist"]
    frames = torch.randint(0, 5, (2, 4, 2, 34, 34)).float()  # (B, T, polarity, H, W)
    out = data.Encoder(spec, 4, "poisson", torch.device("cpu"))(frames, 2)
    assert out.shape == (4, 2, 3, 34, 34)
    assert torch.equal(out[:, :, :2], frames.transpose(0, 1)) and out[:, :, 2].abs().sum() == 0
    with pytest.raises(ValueError, match="event batch must be"):
        data.Encoder(spec, 8, "poisson", torch.device("cpu"))(frames, 2)


def test_missing_event_data_explains_the_manual_download(tmp_path):
    c = configs.load(configs.CONFIG_DIR / "dvs128_gesture_resnet18.yaml", {"data_root": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"(?s)manual download.*DvsGesture.tar.gz.*ibm.*"
                                                r"DVS128Gesture/download"):
        data.load(c)
    assert not (tmp_path / "DVS128Gesture").exists()  # nothing half-created


def test_nmnist_goes_through_spikingjellys_frames_to_the_encoder(tmp_path):
    # A few random recordings in SpikingJelly's own events_np layout (what it builds from the
    # downloaded zips); SpikingJelly integrates them into T frames split by event count.
    import numpy as np
    from torch.utils.data import DataLoader

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("test", 2)):
        for label in range(2):
            folder = tmp_path / "NMNIST" / "events_np" / split / str(label)
            folder.mkdir(parents=True)
            for i in range(per_class):
                n = 400
                np.savez(folder / f"{i}.npz", t=np.sort(rng.integers(0, 300_000, n)),
                         x=rng.integers(0, 34, n), y=rng.integers(0, 34, n), p=rng.integers(0, 2, n))
    c = configs.load(configs.CONFIG_DIR / "nmnist_resnet18.yaml", {"data_root": str(tmp_path)})
    c["T"] = 4
    train_set, test_set = data.load(c)
    assert (len(train_set), len(test_set)) == (6, 4)
    frames, label = train_set[0]
    assert frames.shape == (4, 2, 34, 34) and frames.sum() == 400 and label == 0  # every event counted once
    x, y = next(iter(DataLoader(test_set, batch_size=4)))
    out = data.Encoder(data.spec_of(c), 4, c["static_encoding"], torch.device("cpu"))(x, 4)
    assert out.shape == (4, 4, 3, 34, 34) and out[:, :, 2].abs().sum() == 0
    assert sorted(y.tolist()) == [0, 0, 1, 1]


def test_missing_mnist_without_download_says_where_to_put_it(tmp_path):
    c = configs.load(configs.CONFIG_DIR / "mnist_resnet18.yaml",
                     {"data_root": str(tmp_path), "download": False})
    with pytest.raises(FileNotFoundError, match="download is false"):
        data.load(c)


# ---------------------------------------------------------------- tiny training runs

# (arch, data override, extra arguments): ResNet18 runs two epochs x two repeats with a warm-up;
# the deeper ones the minimum (ResNet50 costs ~3x ResNet18 on the CPU). Synthetic N-MNIST covers
# the event path and a column with the paper's numbers beside ours.
ONCE = ["--epochs", "1", "--repeats", "1", "--max-batches", "1", "--set", "warmup_batches=0"]
RUNS = {
    ("spiking_resnet18", "digits"): ["--epochs", "2", "--repeats", "2", "--max-batches", "1",
                                     "--set", "warmup_batches=2"],  # base.yaml's 10: too slow for CI
    ("spiking_resnet34", "digits"): ONCE,
    ("spiking_resnet50", "digits"): ONCE,
    ("spiking_resnet18", "synthetic"): ONCE + ["--set", "batch_size=2"],
}
CELL = {"digits": "mnist", "synthetic": "nmnist"}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Train every RUNS entry on every available backend; metrics and fused-call counts."""
    root = tmp_path_factory.mktemp("runs")
    backends = ["torch", "temporal_fusion"] + (["cupy"] if CUPY_OK else [])
    results = {}
    original = sj_hook.neuron_multi_step
    for (arch, dataset), extra in RUNS.items():
        for backend in backends:
            calls = []

            def counting(*args, **kwargs):
                calls.append(1)
                return original(*args, **kwargs)

            sj_hook.neuron_multi_step = counting
            try:
                out = root / f"{arch}_{dataset}" / backend
                cell = configs.CONFIG_DIR / f"{CELL[dataset]}_{arch[len('spiking_'):]}.yaml"
                metrics = train.main(["--config", str(cell), "--dataset", dataset, "--backend", backend,
                                      "--device", DEVICE[backend], "--out", str(out)] + TINY + extra)
            finally:
                sj_hook.neuron_multi_step = original
            results[arch, dataset, backend] = {"metrics": metrics, "out": out, "fused_calls": len(calls)}
    return root, results


def _check_complete(metrics: dict, out: Path, backend: str) -> None:
    c = metrics["config"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert "best accuracy" in (out / "train.log").read_text()
    assert (metrics["backend"], metrics["world_size"], c["backend"]) == (backend, 1, backend)
    assert len(metrics["repeats"]) == c["repeats"]
    for r, repeat in enumerate(metrics["repeats"]):
        assert repeat["seed"] == c["seed"] + r
        assert repeat["neuron_backends"] == {backend: LIF_NODES[metrics["arch"]]}
        assert repeat["peak_memory_bytes"] > 0
        assert [e["epoch"] for e in repeat["epochs"]] == list(range(1, c["epochs"] + 1))
        for e in repeat["epochs"]:
            assert e["train_batches"] == e["test_batches"] == c["max_batches"]
            assert e["train_samples"] == e["test_samples"] == c["max_batches"] * c["batch_size"]
            correct = e["test_accuracy"] * e["test_samples"] / 100
            assert abs(correct - round(correct)) < 1e-9 and 0 <= correct <= e["test_samples"]
            assert math.isfinite(e["train_loss"]) and e["train_loss"] > 0
            for phase in ("train", "test"):
                assert 0 < e[f"{phase}_seconds"] <= e[f"{phase}_wall_seconds"]
                assert 0 <= e[f"{phase}_data_seconds"] <= e[f"{phase}_wall_seconds"]
                rate = e[f"{phase}_samples"] / e[f"{phase}_seconds"]
                assert e[f"{phase}_samples_per_s"] == pytest.approx(rate)
        assert repeat["best_accuracy"] == max(e["test_accuracy"] for e in repeat["epochs"])
    s, epochs = metrics["summary"], [e for r in metrics["repeats"] for e in r["epochs"]]
    best = [r["best_accuracy"] for r in metrics["repeats"]]
    assert s["best_accuracy"] == pytest.approx(sum(best) / len(best))
    assert s["train_seconds"] == pytest.approx(sum(e["train_seconds"] for e in epochs) / len(epochs))
    assert s["test_seconds"] == pytest.approx(sum(e["test_seconds"] for e in epochs) / len(epochs))
    assert s["train_seconds_min"] <= s["train_seconds_median"] <= s["train_seconds_max"]
    assert (s["train_seconds_std"] > 0) == (len(epochs) > 1)
    assert (metrics["warmup_seconds"] > 0) == (c["warmup_batches"] > 0)
    env = metrics["environment"]
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["spikingjelly"] == "0.0.0.0.14"
    assert env["device"]["type"] == DEVICE[backend] and env["device"]["name"]


@pytest.mark.slow  # tiny training runs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_a_tiny_run_writes_complete_metrics(tiny_runs, arch, backend):
    run = tiny_runs[1][arch, "digits", backend]
    _check_complete(run["metrics"], run["out"], backend)
    assert run["metrics"]["accuracy_meaningful"] and run["metrics"]["data"]["name"] == "digits"
    # The fused kernels ran for temporal_fusion (every LIF node, every batch) and never otherwise.
    m = run["metrics"]
    batches = sum(e["train_batches"] + e["test_batches"] for r in m["repeats"] for e in r["epochs"])
    if backend == "temporal_fusion":
        assert run["fused_calls"] >= LIF_NODES[arch] * batches
    else:
        assert run["fused_calls"] == 0


@pytest.mark.slow  # tiny training runs
def test_backends_start_from_the_same_weights_data_and_spikes(tiny_runs):
    # The first epoch of a one-batch run reports the loss before any update: the backends share
    # the seed, the batch and the Poisson draws, so only the neuron arithmetic may differ.
    for arch in ARCHS:
        losses = [tiny_runs[1][arch, "digits", b]["metrics"]["repeats"][0]["epochs"][0]["train_loss"]
                  for b in ("torch", "temporal_fusion")]
        assert losses[0] == pytest.approx(losses[1], rel=1e-4), arch


@pytest.mark.slow  # tiny training runs
def test_synthetic_event_run_says_its_accuracy_is_meaningless(tiny_runs):
    run = tiny_runs[1]["spiking_resnet18", "synthetic", "temporal_fusion"]
    m = run["metrics"]
    _check_complete(m, run["out"], "temporal_fusion")
    assert m["synthetic"] and not m["accuracy_meaningful"] and "chance" in m["note"]
    assert m["data"] == {"name": "nmnist", "label": "N-MNIST", "kind": "event",
                         "train_size": 60000, "test_size": 10000}
    assert "meaningless" in (run["out"] / "train.log").read_text()


def test_bf16_autocast_trains(tmp_path):
    m = train.main(["--config", str(configs.CONFIG_DIR / "mnist_resnet18.yaml"), "--dataset", "digits",
                    "--amp", "bf16", "--backend", "temporal_fusion", "--device", "cpu", "--epochs", "1",
                    "--max-batches", "1", "--repeats", "1", "--set", "warmup_batches=0",
                    "--out", str(tmp_path)] + TINY + ["--set", "T=2", "--set", "batch_size=2"])
    assert m["config"]["amp"] == "bf16" and math.isfinite(m["repeats"][0]["epochs"][0]["train_loss"])


def test_cupy_backend_on_the_cpu_is_refused_with_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="backend 'cupy' runs on CUDA tensors only"):
        train.main(["--config", str(configs.CONFIG_DIR / "mnist_resnet18.yaml"), "--dataset", "digits",
                    "--backend", "cupy", "--device", "cpu", "--out", str(tmp_path)] + TINY)


@pytest.mark.parametrize("override, what", [({"amp": "bf16"}, "amp bf16"), ({"dtype": "float64"}, "dtype float64")])
def test_cupy_with_bf16_or_float64_is_refused_up_front(override, what):
    with pytest.raises(configs.ConfigError, match=f"backend cupy with {what}: .*float32 and float16 only"):
        configs.load(configs.CONFIG_DIR / "mnist_resnet18.yaml", {"backend": "cupy", **override})
    configs.load(configs.CONFIG_DIR / "mnist_resnet18.yaml", {"backend": "cupy", "amp": "fp16"})


def test_cupy_test_epoch_times_the_cupy_kernels_not_torchscript():
    """SpikingJelly's eval mode runs TorchScript whatever the backend: cupy's LIF nodes are kept in
    train mode for the (no_grad) test pass, everything else is in eval mode."""
    from spikingjelly.activation_based import neuron
    for backend, lif_training in (("cupy", True), ("torch", False), ("temporal_fusion", False)):
        net = torch.nn.Sequential(torch.nn.BatchNorm1d(3), neuron.LIFNode(step_mode="m")).train()
        train._test_mode(net, {"backend": backend})
        assert not net[0].training and net[1].training == lif_training


# ---------------------------------------------------------------- the table

@pytest.mark.slow  # tiny training runs
def test_table_from_the_tiny_runs(tiny_runs, tmp_path):
    root, results = tiny_runs
    table = report.build(report.load_runs(root))
    paths = report.write(table, tmp_path)
    md = paths["md"].read_text()
    backends = ["torch", "temporal_fusion"] + (["cupy"] if CUPY_OK else [])
    blocks = {"digits": _rows(md, "Static image datasets"), "synthetic": _rows(md, "Event-based datasets")}
    for (arch, dataset, backend), run in results.items():
        s = run["metrics"]["summary"]
        cells = blocks[dataset][report.ARCH_LABELS[arch], report.METHODS[backend]]
        if dataset == "digits":
            spread = f" ± {s['best_accuracy_std']:.2f}" if s["repeats"] > 1 else ""
            assert cells[2] == f"{s['best_accuracy']:.2f}" + spread
        else:  # synthetic: no accuracy, and the paper's N-MNIST times in brackets
            paper = report.load_paper()[arch]["nmnist"][backend]
            assert cells[2] == "n/a"
            assert cells[3].endswith(f"[{paper['train_seconds']:.2f}]")
            assert cells[4].endswith(f"[{paper['test_seconds']:.2f}]")
        for cell, phase in ((cells[3], "train"), (cells[4], "test")):
            spread = f" ± {report._seconds(s[f'{phase}_seconds_std'])}" if s[f"{phase}_seconds_std"] else ""
            assert cell.replace("*", "").startswith(report._seconds(s[f"{phase}_seconds"]) + spread)
    ours = results["spiking_resnet18", "synthetic", "temporal_fusion"]["metrics"]["summary"]
    theirs = results["spiking_resnet18", "synthetic", "torch"]["metrics"]["summary"]
    paper = report.load_paper()["spiking_resnet18"]["nmnist"]
    ratio = theirs["train_seconds"] / ours["train_seconds"]
    paper_ratio = paper["torch"]["train_seconds"] / paper["temporal_fusion"]["train_seconds"]
    speedup = f"| Spiking-ResNet18 | N-MNIST (synthetic) | {ratio:.2f}x [{paper_ratio:.2f}x] |"
    assert speedup in md
    assert "accuracy is chance" in md and "max_batches cut the epochs short" in md
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [(r["architecture"], r["backend"]) for r in rows] == [
        (report.ARCH_LABELS[a], b) for a in ARCHS for b in report.METHODS if b in backends]
    r18 = {r["backend"]: r for r in rows if r["architecture"] == "Spiking-ResNet18"}
    assert float(r18["torch"]["digits_train_seconds"]) == pytest.approx(
        results["spiking_resnet18", "digits", "torch"]["metrics"]["summary"]["train_seconds"], rel=1e-5)
    assert float(r18["torch"]["nmnist_synthetic_train_speedup_of_ours"]) == pytest.approx(
        theirs["train_seconds"] / ours["train_seconds"], rel=1e-5)
    assert float(r18["temporal_fusion"]["nmnist_synthetic_paper_train_seconds"]) == 140.04
    assert r18["torch"]["nmnist_synthetic_accuracy"] == "" and r18["torch"]["digits_paper_accuracy"] == ""
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _rows(md: str, heading: str) -> dict:
    """The rows of the table under ``## heading``, keyed by (architecture, method)."""
    section = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in section.splitlines()
            if line.startswith("| Spiking-ResNet")]
    return {(r[0], r[1]): r for r in rows}


@pytest.mark.slow  # tiny training runs
def test_two_runs_of_one_cell_are_an_error(tiny_runs):
    runs = report.load_runs(tiny_runs[0] / "spiking_resnet34_digits")
    with pytest.raises(ValueError, match=f"two runs of spiking_resnet34 / digits / {runs[0]['backend']}"):
        report.build(runs + [dict(runs[0], path="elsewhere")])


def test_paper_table_is_complete():
    paper = report.load_paper()
    for arch in ARCHS:
        for dataset in ("mnist", "cifar10", "nmnist", "dvs128_gesture"):
            for backend in configs.BACKENDS:
                entry = paper[arch][dataset][backend]
                assert set(entry) == {"accuracy", "train_seconds", "test_seconds"}
                assert 0 < entry["accuracy"] < 100 and entry["test_seconds"] < entry["train_seconds"]
    first = paper["spiking_resnet18"]["mnist"]["torch"]
    assert first == {"accuracy": 98.18, "train_seconds": 170.31, "test_seconds": 10.52}


@pytest.mark.slow  # training runs in subprocesses
def test_table1_command_runs_configs_by_backends_and_retabulates(tmp_path):
    out = tmp_path / "t"
    argv = [sys.executable, str(ROOT / "experiments" / "table1.py"), "--configs",
            str(configs.CONFIG_DIR / "demo" / "digits_resnet18.yaml"),
            "--backends", "torch", "temporal_fusion",
            "--device", "cpu", "--epochs", "1", "--max-batches", "1", "--repeats", "1", "--out", str(out),
            "--set", "T=2", "--set", "batch_size=2", "--set", "warmup_batches=0", "--no-progress"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    md = (out / "table1.md").read_text()
    assert md in done.stdout and "Ours (temporal_fusion)" in md and "SpikingJelly (torch)" in md
    assert (out / "digits_resnet18" / "torch" / "metrics.json").is_file()
    again = table1.main(["--from-runs", str(out), "--out", str(tmp_path / "again")])
    assert again == 0 and (tmp_path / "again" / "table1.md").read_text() == md
    assert (tmp_path / "again" / "table1.csv").read_text() == (out / "table1.csv").read_text()
    if not CUPY_OK:
        with pytest.raises(SystemExit, match="backend cupy asked for but it cannot run here"):
            table1.main(argv[2:4] + ["--backends", "cupy", "--out", str(tmp_path / "no")])


# ---------------------------------------------------------------- data parallel

@pytest.mark.slow  # torchrun with two processes
def test_torchrun_with_two_gloo_processes_reproduces_one_process(tmp_path):
    # float64: in float32, rounding differences between one and two processes flip a few spikes
    # (thresholds) and Adam's first steps, lr * sign(g), amplify them, so runs drift apart; in
    # float64 they agree to ~1e-15 and any real difference (sharding, Poisson draws, batch
    # statistics, gradient averaging) shows.
    args = ["--config", str(configs.CONFIG_DIR / "mnist_resnet18.yaml"), "--dataset", "digits",
            "--backend", "temporal_fusion", "--device", "cpu", "--epochs", "2", "--max-batches", "2",
            "--repeats", "1", "--set", "T=2", "--set", "batch_size=8", "--set", "dtype=float64",
            "--set", "num_workers=0", "--set", "warmup_batches=0", "--no-progress"]
    one = train.main(args + ["--out", str(tmp_path / "one")])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(torchrun + [str(ROOT / "experiments" / "train.py")] + args
                          + ["--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for a, b in zip(one["repeats"][0]["epochs"], two["repeats"][0]["epochs"]):
        assert (a["train_samples"], a["test_samples"]) == (b["train_samples"], b["test_samples"]) == (16, 16)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)
        assert b["test_accuracy"] == a["test_accuracy"]
    assert two["summary"]["best_accuracy"] == one["summary"]["best_accuracy"]
