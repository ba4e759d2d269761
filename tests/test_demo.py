"""The demo's report (experiments/demo.py) and Table 1's accuracy-over-seeds section
(experiments/report.py), on fabricated results: what a reader is told, and that it cannot be
one seed dressed up as a result."""
import pytest

from experiments import demo, report


def fake_result(accuracies: dict, load: float = 0.1) -> dict:
    step = {"step": 1, "loss": {"temporal_fusion": 2.25, "torch": 2.25}, "loss_abs_diff": 0.0,
            "grad_max_abs_diff": 1.4e-7, "weight_max_abs_diff_after": 1e-4}
    rows = [{"method": "torch", "status": "ok", "median_ms": 300.0, "speedup_vs_torch": 1.0, "peak_mib": 137.0,
             "memory_vs_torch": 1.0, "grad_rel_diff_vs_torch": 0.0, "memory_measure": "allocation events"},
            {"method": "temporal_fusion", "status": "ok", "median_ms": 150.0, "speedup_vs_torch": 2.0,
             "peak_mib": 100.0, "memory_vs_torch": 0.73, "grad_rel_diff_vs_torch": 1e-6},
            {"method": "cupy", "status": "skipped", "reason": "CUDA only"}]
    runs = {b: {"seeds": [0, 1, 2], "accuracy": acc, "mean": sum(acc) / len(acc),
                "std": (sum((a - sum(acc) / len(acc)) ** 2 for a in acc) / (len(acc) - 1)) ** 0.5,
                "train_seconds_per_epoch": 20.0, "epochs": 1, "T": 4} for b, acc in accuracies.items()}
    return {"first_step": {"T": 4, "batch": 32, "lr": 1e-3, **step, "grad_max_abs_diff_at": "conv1.weight",
                           "grad_max_abs": 0.15, "grad_sign_differences": 0, "grad_elements": 100,
                           "steps": [step, dict(step, step=2)]},
            "step": {"T": 32, "batch": 4, "image": "3x28x28", "reps": 3, "loadavg_start": [load, 0, 0],
                     "device": "cpu", "rows": rows},
            "train": {"exit_code": 0, "runs": runs}, "seconds": 200.0}


def test_demo_report_shows_spread_first_step_and_step_at_T32():
    text = demo.markdown(fake_result({"temporal_fusion": [60.0, 70.0, 65.0], "torch": [66.0, 72.0, 61.0]}))
    assert "60.0, 70.0, 65.0" in text and "65.0 ± 5.0" in text  # every seed, mean ± std
    assert "within two seed-to-seed standard deviations" in text
    assert "1.40e-07" in text and "| 2 |" in text  # first-step gradients, the weight drift table
    assert "One training step at T=32" in text and "| temporal_fusion | 150 | 2.00x | 100 | 0.73x" in text
    assert "cupy | skipped: CUDA only" in text
    assert "measured under load" not in text


def test_demo_report_flags_load_and_real_differences():
    text = demo.markdown(fake_result({"temporal_fusion": [90.0, 91.0, 90.5], "torch": [60.0, 61.0, 60.5]},
                                     load=3.0))
    assert "outside two seed-to-seed standard deviations" in text
    assert "measured under load" in text


def test_table1_seeds_section_lists_every_seed_and_warns_under_three():
    column = report.Column("digits", "Digits", "static", False)

    def run(accuracies):
        mean = sum(accuracies) / len(accuracies)
        return {"accuracy_meaningful": True,
                "repeats": [{"seed": i, "best_accuracy": a} for i, a in enumerate(accuracies)],
                "summary": {"best_accuracy": mean, "best_accuracy_std": 1.0}}
    table = report.Table(runs={("spiking_resnet18", column.key, "torch"): run([50.0, 52.0, 54.0]),
                               ("spiking_resnet18", column.key, "temporal_fusion"): run([51.0])},
                         columns={column.key: column}, archs=["spiking_resnet18"],
                         backends=["torch", "temporal_fusion"])
    lines = report._seeds_section(table)
    text = "\n".join(lines)
    assert "| Spiking-ResNet18 | Digits | SpikingJelly (torch) | 0, 1, 2 | 50.00, 52.00, 54.00 | 52.00 ± 1.00 | 50.00 - 54.00 |" in text
    assert "one seed: no spread" in text
    assert any("fewer than 3 seeds" in note for note in table.notes)


@pytest.mark.slow  # two training runs
def test_first_steps_agree_at_step_one_on_real_digits():
    import torch
    from experiments import config as configs
    config = configs.load(demo.CONFIG, {"T": 2, "batch_size": 4})
    result = demo.first_steps(config, torch.device("cpu"), steps=2)
    assert result["loss_abs_diff"] < 1e-5
    assert result["grad_max_abs_diff"] < 1e-5 * max(1.0, result["grad_max_abs"])
    assert [h["step"] for h in result["steps"]] == [1, 2]
    assert result["grad_elements"] > 10_000_000  # every parameter of Spiking-ResNet18 compared
    assert "First steps" in demo.markdown({"first_step": result, "seconds": 1.0})


def test_step_at_T_rows():
    import torch
    step = demo.step_at_T(torch.device("cpu"), T=2, batch=1, reps=1)
    rows = {r["method"]: r for r in step["rows"]}
    assert set(rows) == {"torch", "temporal_fusion", "temporal_fusion+spike_bits"}
    for r in rows.values():
        assert r["status"] == "ok" and r["peak_mib"] > 0, r
    assert rows["temporal_fusion+spike_bits"]["grad_bitwise_equal_to_temporal_fusion"] is True


def test_train_reads_every_seed_of_each_backend(tmp_path, monkeypatch):
    import json
    calls = []

    def fake_table1(argv):
        calls.append(argv)
        for b, base in (("temporal_fusion", 60.0), ("torch", 61.0)):
            folder = tmp_path / "digits_resnet18" / b
            folder.mkdir(parents=True)
            metrics = {"repeats": [{"seed": s, "best_accuracy": base + s} for s in range(3)],
                       "summary": {"train_seconds": 12.0}, "config": {"epochs": 1, "T": 4}}
            (folder / "metrics.json").write_text(json.dumps(metrics))
        return 0
    monkeypatch.setattr(demo.table1, "main", fake_table1)
    result = demo.train(["--epochs", "1"], tmp_path, "cpu")
    assert calls[0][-2:] == ["--epochs", "1"] and "--device" in calls[0]
    assert result["runs"]["torch"]["accuracy"] == [61.0, 62.0, 63.0]
    assert result["runs"]["torch"]["mean"] == 62.0 and result["runs"]["torch"]["std"] == 1.0
    assert result["runs"]["temporal_fusion"]["seeds"] == [0, 1, 2]
