"""./dev gpu (experiments/gpu_validation/) on the CPU with small sizes, as CI runs it: every
stage runs or says why not, the prebuild builds every variant the later stages launch, a stage
over its budget is cut and says so, results are tagged and summarised. The first GPU run must
not fail on the orchestration itself."""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from experiments.gpu_validation import ncu, record, stages
from experiments.gpu_validation.run import main, tag
from experiments.gpu_validation.stage import Context
from sj_temporal_fusion import lif_multi_step, ops
from sj_temporal_fusion.neurons import REGISTRY
from sj_temporal_fusion.variants import fixup_variant

from conftest import require_nvrtc

ROOT = Path(__file__).resolve().parents[1]
STAGE_NAMES = [name for name, _, _ in stages.STAGES]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-smoke")
    code = main(["--cpu-smoke", "--out", str(out)])
    return code, out, json.loads((out / "validation.json").read_text())


@pytest.mark.slow  # every stage in a subprocess
def test_cpu_smoke_runs_every_stage_or_says_why_not(smoke):
    code, out, report = smoke
    by_name = {s["name"]: s for s in report["stages"]}
    assert list(by_name) == STAGE_NAMES
    for name in ("doctor", "prebuild", "bench_lif", "bench_memory", "bench_net", "nccl_smoke"):
        assert by_name[name]["status"] == "ok", (name, by_name[name]["reason"], by_name[name]["log_tail"])
    for name in ("pytest_gpu", "ncu"):
        assert by_name[name]["status"] == "skipped" and by_name[name]["reason"].startswith("CUDA only")
    assert code == 0
    assert json.loads((out / "doctor.json").read_text())["ok"] is True
    lif = json.loads((out / "lif-cpu.json").read_text())
    assert lif["complete"] and lif["copy_bandwidth"]["gb_per_s"] > 0
    assert {r["method"] for r in lif["results"] if r["status"] == "ok"} == {"temporal_fusion", "torch", "serial"}
    assert json.loads((out / "memory-cpu.json").read_text())["complete"]
    net_rows = json.loads((out / "net-cpu.json").read_text())["results"]
    assert {(r["model"], r["mode"]) for r in net_rows if r["method"] == "temporal_fusion" and r["status"] == "ok"} == \
        {(m, mode) for m in ("resnet18", "spikformer") for mode in ("train", "infer")}
    assert report["smoke"] and report["commit"] and report["environment"]["versions"]["torch"]
    # What a stage leaves unused passes on (pytest_gpu was skipped: its budget goes to bench_lif).
    assert by_name["bench_lif"]["budget_s"] >= stages.CPU_SMOKE_BUDGETS["bench_lif"] + \
        stages.CPU_SMOKE_BUDGETS["pytest_gpu"]


@pytest.mark.slow  # the smoke run
def test_prebuild_built_every_variant_the_stages_launched(smoke):
    """Each stage that launches kernels recorded them; none launched a variant the prebuild
    had not built, so no stage spent its budget compiling; the prebuild says how long it took."""
    _, out, report = smoke
    by_name = {s["name"]: s for s in report["stages"]}
    ctx = Context(out, "cpu", True, False, {})
    plan = json.loads((out / stages.VARIANTS_FILE).read_text())
    assert set(plan) == {"pytest_gpu", "bench_lif", "bench_memory", "bench_net", "nccl_smoke", "ncu"}
    for name in ("bench_lif", "bench_memory", "bench_net", "nccl_smoke"):
        log = stages.launched_log(ctx, name)
        launched = record.read(log)
        assert launched["host"] and not launched["gpu"], name  # the CPU run: host build only
        assert plan[name]["host"], name
        assert stages.not_prebuilt(ctx, log) == [], name
        assert "prebuild did not build" not in by_name[name]["reason"]
    prebuild = json.loads((out / "prebuild.json").read_text())
    assert prebuild["host_variants"] == len({e for p in plan.values() for e in p["host"]}) > 0
    assert prebuild["gpu_variants"] == 0 and prebuild["build_seconds"] >= 0
    assert re.search(r"\d+ host and 0 GPU variants, found in \d+ s, built in [\d.]+ s", by_name["prebuild"]["reason"])


def test_a_launch_the_prebuild_missed_is_named(tmp_path):
    ctx = Context(tmp_path, "cpu", True, False, {})
    (tmp_path / stages.VARIANTS_FILE).write_text(json.dumps({"a": {"host": ["k<1>"], "gpu": []},
                                                             "b": {"host": ["k<2>"], "gpu": ["k<1>"]}}))
    log = tmp_path / "launched.txt"
    sink = record.LogFile(log)
    for build, expression in (("host", "k<1>"), ("host", "k<2>"), ("gpu", "k<1>"), ("host", "k<3>"),
                              ("gpu", "k<2>"), ("host", "k<3>")):
        sink(build, expression)
    assert stages.not_prebuilt(ctx, log) == [("host", "k<3>"), ("gpu", "k<2>")]


def test_recording_without_launching_names_the_same_variants():
    """The planning mode records what a real run launches, compiles nothing and zeroes the
    launch's tensors."""
    x = torch.randn(7, 33, requires_grad=True)
    real, planned = [], []
    with record.recording(lambda b, e: real.append((b, e))):
        s = lif_multi_step(x, tau=1.7, v_threshold=0.4)[0]
        s.sum().backward()
    assert s.sum() > 0
    original = ops.launch
    with record.recording(lambda b, e: planned.append((b, e)), launch=False):
        x2 = x.detach().clone().requires_grad_()
        s2 = lif_multi_step(x2, tau=1.7, v_threshold=0.4)[0]
        s2.sum().backward()
    assert ops.launch is original
    assert planned == real and [e.split("<")[0] for _, e in real] == ["neuron_forward", "neuron_backward"]
    assert not s2.any() and not x2.grad.any()


def test_full_run_fits_eight_minutes():
    assert sum(stages.BUDGETS.values()) <= 8 * 60 - 10  # stages never exceed their budgets; 10 s for start-up
    assert set(stages.BUDGETS) == set(STAGE_NAMES) == set(stages.CPU_SMOKE_BUDGETS)


def test_the_nccl_smoke_interpreter_turns_no_warning_into_an_error(tmp_path):
    """The first GPU run (H200, torch 2.11) failed its NCCL smoke at import: the command ran under
    `python -W error::DeprecationWarning`, and torch 2.11 deprecates the @torch.jit.script that
    SpikingJelly 0.0.0.0.14 applies on import. The smoke run makes DeprecationWarning an error
    around its stages itself; the interpreter must not do it for everything it imports."""
    ctx = Context(tmp_path, "cuda", False, True, dict(stages.BUDGETS))
    argv = stages.nccl_smoke_command(ctx, tmp_path / "smoke.json").recorded(tmp_path / "log")
    assert not any(a.startswith("-W") for a in argv[1:argv.index("-m")]), argv


@pytest.mark.slow  # the smoke run
def test_summary_digests_the_stages(smoke):
    _, out, _ = smoke
    md = (out / "summary.md").read_text()
    assert md.startswith("# GPU validation: ") and "CPU smoke run" in md
    for text in ("| prebuild | ok | ", "| bench_lif | ok | ", "| ncu | skipped | ", "## bench lif (N = 4,099",
                 "## bench memory", "## Whole-network step", "| spikformer | temporal_fusion | train | "):
        assert text in md


def test_a_stage_over_its_budget_is_cut_and_says_so(tmp_path):
    code = main(["--cpu-smoke", "--out", str(tmp_path), "--stages", "bench_lif", "--budget-scale", "0.02"])
    stage = json.loads((tmp_path / "validation.json").read_text())["stages"][0]
    assert code == 1 and stage["status"] == "cut"
    assert stage["reason"].startswith("overran its budget of 2 s") and 2 <= stage["seconds"] < 30
    assert "| bench_lif | cut |" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow  # ./dev gpu in a subprocess
def test_dev_gpu_entry_point(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "dev"), "gpu", "--cpu-smoke", "--stages", "doctor", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "VENV": os.environ.get("VENV", ".venv")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[gpu] doctor: ok" in proc.stdout and (tmp_path / "summary.md").exists()


def test_ncu_profiles_the_kernels_we_launch():
    """The profiler's kernel filter matches every kernel the package launches (forward and
    backward, recorded here; the time-sharding fix-up, named by the variants module), as ncu
    names them (demangled, template arguments included)."""
    launched = []
    x = torch.randn(5, 64, requires_grad=True)
    with record.recording(lambda b, e: launched.append(e)):
        lif_multi_step(x, tau=1.7)[0].sum().backward()
    launched += [fixup_variant(m, torch.float32, m.forms[0]) for m in REGISTRY.values() if m.shardable]
    assert {e.split("<")[0] for e in launched} == set(ncu.kernel_names()) == \
        {"neuron_forward", "neuron_backward", "neuron_fixup"}
    pattern = ncu.kernel_filter().removeprefix("regex:")
    for expression in launched:
        assert re.search(pattern, f"void {expression}(const float *, float *, int, long long)"), expression


def test_ncu_csv_and_tag():
    text = ('==PROF== Connected to process 1\n"ID","Process ID","Process Name","Host Name","Kernel Name",'
            '"Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
            '"Metric Value"\n"0","1","python","h","void neuron_forward<LifModel, float, 7>(...)","1","7",'
            '"(256, 1, 1)","(3907, 1, 1)","0","9.0","Command line profiler metrics",'
            '"dram__throughput.avg.pct_of_peak_sustained_elapsed","%","91.5"\n')
    assert ncu.parse_csv(text) == [{"kernel": "void neuron_forward<LifModel, float, 7>(...)",
                                    "metric": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
                                    "value": "91.5", "unit": "%"}]
    assert tag("NVIDIA H100 80GB HBM3", "0123456789abcdef", "2026-11-25") == \
        "gpu-nvidia-h100-80gb-hbm3-2026-11-25-0123456789"


def test_prebuild_builds_the_gpu_variants_where_the_launcher_looks(monkeypatch, tmp_path):
    """The GPU half of the prebuild, up to the device: NVRTC compiles the planned variants for
    the device's sm_XY with the launcher's options, into the cache entry the launcher reads."""
    require_nvrtc()
    monkeypatch.setenv("SJ_TF_CACHE", str(tmp_path))  # empty: the entry can only come from the build
    from experiments.gpu_validation import variants
    from sj_temporal_fusion import _cache, _cuda, _nvrtc
    from sj_temporal_fusion.variants import forward_variant
    expression = forward_variant(REGISTRY["lif"], torch.float64, REGISTRY["lif"].forms[-1] & ~REGISTRY["lif"].detach_bit)
    monkeypatch.setattr(variants, "gpu_arch", lambda: "80")
    report = variants.build({"bench_lif": {"host": [], "gpu": [expression]}}, cuda=True)
    assert report["gpu_variants"] == 1 and report["host_variants"] == 0 and report["gpu_seconds"] >= 0
    entry = _cache.root() / "cuda" / _nvrtc.cache_key(expression, "80", tuple(_cuda.OPTIONS))[:24]
    assert entry.is_relative_to(tmp_path)
    binary, name = _nvrtc._cached(entry)
    assert binary[:4] == b"\x7fELF" and name.startswith("_Z")
