"""./dev gpu (experiments/gpu_validation.py) on the CPU with small sizes, as CI runs it: every
stage runs or says why not, a stage over its budget is cut and says so, results are tagged and
summarised. The first GPU run must not fail on the orchestration itself."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from experiments import gpu_validation as gv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-smoke")
    code = gv.main(["--cpu-smoke", "--out", str(out)])
    return code, out, json.loads((out / "validation.json").read_text())


def test_cpu_smoke_runs_every_stage_or_says_why_not(smoke):
    code, out, report = smoke
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == [name for name, _ in gv.STAGES]
    for name in ("doctor", "bench_lif", "bench_memory", "bench_net", "nccl_smoke"):
        assert stages[name]["status"] == "ok", (name, stages[name]["reason"], stages[name]["log_tail"])
    for name in ("pytest_gpu", "ncu"):
        assert stages[name]["status"] == "skipped" and stages[name]["reason"].startswith("CUDA only")
    assert code == 0
    assert json.loads((out / "doctor.json").read_text())["ok"] is True
    lif = json.loads((out / "lif-cpu.json").read_text())
    assert lif["complete"] and lif["copy_bandwidth"]["gb_per_s"] > 0
    assert {r["method"] for r in lif["results"] if r["status"] == "ok"} == {"temporal_fusion", "torch", "serial"}
    assert json.loads((out / "memory-cpu.json").read_text())["complete"]
    assert (out / "net-cpu.json").exists()
    assert report["smoke"] and report["commit"] and report["environment"]["versions"]["torch"]
    # What a stage leaves unused passes on (pytest_gpu was skipped: its budget goes to bench_lif).
    assert stages["bench_lif"]["budget_s"] >= gv.CPU_SMOKE_BUDGETS["bench_lif"] + gv.CPU_SMOKE_BUDGETS["pytest_gpu"]


def test_full_run_fits_eight_minutes():
    assert sum(gv.BUDGETS.values()) <= 8 * 60 - 10  # stages never exceed their budgets; 10 s for start-up


def test_summary_digests_the_stages(smoke):
    _, out, _ = smoke
    md = (out / "summary.md").read_text()
    assert md.startswith("# GPU validation: ") and "CPU smoke run" in md
    for text in ("| bench_lif | ok | ", "| ncu | skipped | ", "## bench lif (N = 4,099", "## bench memory",
                 "## Spiking-ResNet18 step"):
        assert text in md


def test_a_stage_over_its_budget_is_cut_and_says_so(tmp_path):
    code = gv.main(["--cpu-smoke", "--out", str(tmp_path), "--stages", "bench_lif", "--budget-scale", "0.02"])
    stage = json.loads((tmp_path / "validation.json").read_text())["stages"][0]
    assert code == 1 and stage["status"] == "cut"
    assert stage["reason"].startswith("overran its budget of 2 s") and 2 <= stage["seconds"] < 30
    assert "| bench_lif | cut |" in (tmp_path / "summary.md").read_text()


def test_net_stage_stand_in(tmp_path):
    """Where bench net does not exist, a minimal Spiking-ResNet18 train + infer step per backend."""
    code = gv.main(["--cpu-smoke", "--out", str(tmp_path), "--stages", "bench_net", "--force-net-fallback"])
    assert code == 0
    rows = {(r["method"], r["mode"]): r for r in json.loads((tmp_path / "net-cpu.json").read_text())["results"]}
    for method in ("torch", "temporal_fusion"):
        for mode in ("train", "infer"):
            assert rows[method, mode]["status"] == "ok" and rows[method, mode]["median_ms"] > 0
    assert rows["cupy", "train"]["status"] == "skipped" and "CUDA" in rows["cupy", "train"]["reason"]


def test_dev_gpu_entry_point(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "dev"), "gpu", "--cpu-smoke", "--stages", "doctor", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "VENV": os.environ.get("VENV", ".venv")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[gpu] doctor: ok" in proc.stdout and (tmp_path / "summary.md").exists()


def test_ncu_csv_and_tag():
    text = ('==PROF== Connected to process 1\n"ID","Process ID","Process Name","Host Name","Kernel Name",'
            '"Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
            '"Metric Value"\n"0","1","python","h","void lif_forward<float>(...)","1","7","(256, 1, 1)",'
            '"(3907, 1, 1)","0","9.0","Command line profiler metrics",'
            '"dram__throughput.avg.pct_of_peak_sustained_elapsed","%","91.5"\n')
    assert gv.parse_ncu_csv(text) == [{"kernel": "void lif_forward<float>(...)",
                                       "metric": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
                                       "value": "91.5", "unit": "%"}]
    assert gv.tag("NVIDIA H100 80GB HBM3", "0123456789abcdef", "2026-11-25") == \
        "gpu-nvidia-h100-80gb-hbm3-2026-11-25-0123456789"
