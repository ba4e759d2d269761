"""python -m sj_temporal_fusion.doctor: versions, checks with cause and fix, kernel runs against
the reference. Failures are created for real where a CPU allows it (a CXX that does not exist with
an empty kernel cache, two CuPy wheels in the package metadata, a torch of another CUDA major);
the GPU-only ones go through the same decision functions with a GPU's facts."""
import importlib.metadata
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from sj_temporal_fusion import doctor

ROOT = Path(__file__).resolve().parents[1]


def by_name(checks):
    return {c.name if hasattr(c, "name") else c["name"]: c for c in checks}


def test_healthy_cpu_machine_passes_and_says_what_it_ran(capsys):
    assert doctor.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    v = report["versions"]
    assert v["torch"] == torch.__version__ and v["spikingjelly"] == "0.0.0.0.14"
    assert v["host_compiler_version"] and v["openmp"]
    cpu = report["devices"][0]
    assert cpu["device"] == "cpu" and cpu["status"] == "ok" and cpu["problems"] == []
    assert "host build" in cpu["build"]
    assert len(report["devices"]) == 1 + torch.cuda.device_count() * torch.cuda.is_available()


def test_text_report_names_every_device_and_the_verdict(capsys):
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert "devices:" in out and "[  ok] cpu:" in out and out.rstrip().endswith("all devices pass")


@pytest.mark.slow  # a subprocess
def test_no_compiler_and_an_empty_cache_fail_with_the_fix(tmp_path):
    """Real failure: a fresh process whose CXX points at nothing and whose kernel cache is empty
    must build the host kernels and cannot."""
    env = {**os.environ, "CXX": str(tmp_path / "nonexistent-g++"), "SJ_TF_CACHE": str(tmp_path / "cache"),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "sj_temporal_fusion.doctor", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    compiler = by_name(report["checks"])["C++ compiler"]
    assert compiler["status"] == "fail" and "nonexistent-g++" in compiler["detail"]
    assert "apt-get install g++" in compiler["fix"] and "CXX" in compiler["fix"]
    cpu = report["devices"][0]
    assert cpu["status"] == "fail" and cpu["cause"] == "no C++ compiler for the host build"
    assert "nonexistent-g++" in cpu["fix"]
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing was built


def _with_fake_cupy_wheel(monkeypatch, name):
    real = importlib.metadata.distributions

    def distributions(*args, **kwargs):
        yield from real(*args, **kwargs)
        yield types.SimpleNamespace(metadata={"Name": name})
    monkeypatch.setattr(importlib.metadata, "distributions", distributions)


def test_two_cupy_wheels_fail_with_the_fix(monkeypatch):
    pytest.importorskip("cupy")
    installed = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()
                 if (d.metadata["Name"] or "").lower().startswith("cupy")}
    other = "cupy-cuda12x" if "cupy-cuda13x" in installed else "cupy-cuda13x"
    _with_fake_cupy_wheel(monkeypatch, other)
    info = doctor.versions()
    assert other in info["cupy_distributions"] and len(info["cupy_distributions"]) == 2
    check = by_name(doctor.environment_checks(info, []))["one CuPy wheel"]
    assert check.status == doctor.FAIL and "share the import name" in check.cause
    torch_major = torch.version.cuda.split(".")[0] if torch.version.cuda else None
    assert check.fix.startswith("pip uninstall -y cupy-cuda12x cupy-cuda13x && pip install ")
    if torch_major:
        assert check.fix.endswith(f"cupy-cuda{torch_major}x")


def test_cupy_cuda_major_other_than_torchs_fails_with_the_fix(monkeypatch):
    pytest.importorskip("cupy")
    info = doctor.versions()
    assert info["cupy_cuda"] is not None
    other = 12 if info["cupy_cuda"] != 12 else 13
    monkeypatch.setattr(torch.version, "cuda", f"{other}.8")
    info = doctor.versions()
    check = by_name(doctor.environment_checks(info, []))["CuPy's CUDA matches torch's"]
    assert check.status == doctor.FAIL
    assert check.fix == (f"pip uninstall -y cupy-cuda{info['cupy_cuda']}x && pip install "
                         f"'sj-temporal-fusion[cuda{other}]'   (= cupy-cuda{other}x)")


def test_nvrtc_not_loadable_fails_where_a_gpu_needs_it(monkeypatch):
    pytest.importorskip("cupy")
    from cupy.cuda import nvrtc

    def broken():
        raise RuntimeError("CuPy failed to load libnvrtc.so.13: OSError: libnvrtc.so.13: cannot open shared object file")
    monkeypatch.setattr(nvrtc, "getVersion", broken)
    info = doctor.versions()
    assert info["nvrtc"] is None and "libnvrtc" in info["nvrtc_error"]
    gpu = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "capability": (9, 0)}
    with_gpu = by_name(doctor.environment_checks(info, [gpu]))["NVRTC loadable"]
    assert with_gpu.status == doctor.FAIL and with_gpu.fix.startswith("pip install nvidia-cuda-nvrtc-cu")
    assert by_name(doctor.environment_checks(info, []))["NVRTC loadable"].status == doctor.WARN


@pytest.mark.parametrize("capability, nvrtc_major, status", [
    ((6, 0), 13, doctor.FAIL), ((7, 0), 13, doctor.FAIL), ((7, 5), 13, doctor.OK), ((9, 0), 13, doctor.OK),
    ((6, 0), 12, doctor.OK), ((3, 7), 12, doctor.FAIL)])
def test_gpu_older_than_supported(capability, nvrtc_major, status):
    check = doctor.gpu_age_check({"index": 0, "name": "some GPU", "capability": capability}, nvrtc_major)
    assert check.status == status
    if status == doctor.FAIL:
        assert "compute capability" in check.fix and f"sm_{capability[0]}{capability[1]}" in check.detail


def test_spikingjelly_cupy_numpy_int_is_explained():
    import numpy
    check = doctor.spikingjelly_cupy_check()
    if "int" in vars(numpy):
        assert check.status == doctor.OK
    else:  # NumPy >= 1.24 with SpikingJelly 0.0.0.0.14: its cupy backend dies on np.int
        assert check.status == doctor.WARN and "base.py" in check.detail
        assert "numpy_int_alias" in check.fix and "temporal_fusion' is not affected" in check.fix


def test_wrong_results_fail_the_device(monkeypatch):
    real = doctor._run

    def off_by_one_spike(x, grad):
        spike, v_seq, gx = real(x, grad)
        spike = spike.clone()
        spike[0, 0] = 1 - spike[0, 0]
        return spike, v_seq, gx
    monkeypatch.setattr(doctor, "_run", off_by_one_spike)
    result = doctor.run_device("cpu", "host build")
    assert result["status"] == doctor.FAIL
    assert any(p.startswith("float64: spikes differ") for p in result["problems"])


@pytest.mark.parametrize("message, cause", [
    ("CUDA_ERROR_NO_BINARY_FOR_GPU: no kernel image is available", "no machine code"),
    ("cudaErrorInsufficientDriver: CUDA driver version is insufficient", "driver is older"),
    ("a CUDA tensor was given but CuPy is not installed", "CuPy, which is missing")])
def test_known_gpu_errors_are_explained(message, cause):
    assert cause in doctor.explain(RuntimeError(message), "cuda:0")[0]


def test_gpu_vs_host_comparison_runs_its_subnormal_case():
    """The GPU-vs-host comparison, run host against host: no differences, and its subnormal
    columns really hold subnormal membrane potentials (what a flush-to-zero GPU build loses)."""
    assert doctor.compare_gpu_with_host("cpu") == []
    x, grad = doctor._case(torch.float32, "cpu", seed=1)
    x[:, -doctor.DENORMAL_COLUMNS:] = 0
    x[0, -doctor.DENORMAL_COLUMNS:] = 1e-37
    _, v, _ = doctor._run(x, grad)
    tail = v[:, -doctor.DENORMAL_COLUMNS:]
    assert ((tail != 0) & (tail.abs() < torch.finfo(torch.float32).tiny)).any()


# ---------------------------------------------------------------- kernel sources and CuPy's compile API

def _csrc_copy(tmp_path, without=()):
    import shutil
    from sj_temporal_fusion import _nvrtc
    csrc = tmp_path / "csrc"
    shutil.copytree(_nvrtc.CSRC, csrc)
    for rel in without:
        (csrc / rel).unlink()
    return csrc


def test_installed_kernel_sources_are_complete():
    from sj_temporal_fusion import _nvrtc
    from sj_temporal_fusion.neurons import REGISTRY
    needed, missing = _nvrtc.kernel_sources()
    assert missing == []
    # what the code names, not a glob: every registered model's header and the files they include
    assert {f"neurons/{m}.cuh" for m in REGISTRY} | {"temporal.cu", "neurons/base.cuh", "common/fp.cuh",
                                                     "common/lanes.cuh", "surrogate.cuh"} <= set(needed)
    assert by_name(doctor.environment_checks(doctor.versions(), []))["kernel sources"].status == doctor.OK


@pytest.mark.parametrize("lost", [
    ("neurons/lif.cuh",),          # a model header only the registry names (no file includes it)
    ("common/lanes.cuh",),         # included by temporal.cu
    ("common/host_shim.h", "neurons/klif.cuh")])  # included two levels down; and a second one
def test_missing_kernel_sources_fail_naming_them_and_the_fix(tmp_path, lost):
    csrc = _csrc_copy(tmp_path, lost)
    check = doctor.kernel_sources_check(csrc)
    assert check.status == doctor.FAIL
    assert str(csrc) in check.detail and f"{len(lost)} of the" in check.detail
    assert f"kernel sources are missing from {csrc}: {', '.join(sorted(lost))};" in check.cause
    assert "reinstall" in check.fix and "zipfile" in check.fix


def test_a_failed_run_with_missing_sources_names_them_not_the_compiler(tmp_path, monkeypatch):
    from sj_temporal_fusion import _nvrtc
    monkeypatch.setattr(_nvrtc, "CSRC", _csrc_copy(tmp_path, ("neurons/lif.cuh",)))
    error = RuntimeError("host build of kernel neuron_forward<LifModel, float, 0> failed: "
                         "neurons/lif.cuh: No such file or directory")
    cause, fix = doctor.explain(error, "cpu")
    assert "kernel sources are missing" in cause and "neurons/lif.cuh" in cause and "reinstall" in fix


def test_a_cupy_without_the_compile_api_is_named_not_taken_for_nvrtc(monkeypatch):
    """A CuPy whose NVRTC bindings lack what the build calls: the check fails where a GPU needs
    it, and a kernel run failing on it is explained as that, not as 'NVRTC cannot be loaded'."""
    pytest.importorskip("cupy")
    import cupy
    from cupy.cuda import nvrtc

    from sj_temporal_fusion import _nvrtc
    assert by_name(doctor.environment_checks(doctor.versions(), []))["CuPy's NVRTC bindings"].status == doctor.OK
    monkeypatch.setattr(cupy, "__version__", "13.1.0")
    monkeypatch.delattr(nvrtc, "getLoweredName")
    gpu = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "capability": (9, 0)}
    check = by_name(doctor.environment_checks(doctor.versions(), [gpu]))["CuPy's NVRTC bindings"]
    assert check.status == doctor.FAIL and "13.1.0" in check.detail and "getLoweredName" in check.cause
    assert all(v in check.cause for v in _nvrtc.CHECKED_CUPY) and check.fix.startswith("pip install 'cupy-cuda")
    assert by_name(doctor.environment_checks(doctor.versions(), []))["CuPy's NVRTC bindings"].status == doctor.WARN
    with pytest.raises(_nvrtc.UnsupportedCuPy) as info:
        _nvrtc.compile_cubin("", (), ["k"], "90")
    cause, fix = doctor.explain(info.value, "cuda:0")
    assert "getLoweredName" in cause and "cannot load" not in cause and fix == check.fix


def test_a_cupy_newer_than_checked_is_a_warning(monkeypatch):
    pytest.importorskip("cupy")
    import cupy
    monkeypatch.setattr(cupy, "__version__", "15.0.0")
    check = doctor.cupy_compile_api_check(have_gpu=True)
    assert check.status == doctor.WARN and "newer than the versions checked" in check.detail
