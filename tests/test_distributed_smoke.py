"""The single-GPU smoke run (sj_temporal_fusion/distributed/smoke.py): its CPU run with NCCL
emulated (tests/_smoke_on_cpu.py), as one command, and its kernel comparison's calls on the host
build. The GPU run itself is `python -m sj_temporal_fusion.distributed.smoke`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _nccl_emulation as emu

ROOT = Path(__file__).resolve().parents[1]
ON_CPU = str(ROOT / "tests" / "_smoke_on_cpu.py")


@pytest.mark.slow  # ranks in subprocesses
def test_cpu_run_passes_as_one_command(tmp_path):
    out = tmp_path / "smoke.json"
    done = subprocess.run([sys.executable, ON_CPU, "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    status = {s["name"]: s["status"] for s in result["stages"]}
    assert status == {"shard kernels: CUDA vs host build": "skipped",
                      "one-rank NCCL communicator: send/recv to itself": "passed",
                      "receive from itself without a send: refused at once": "passed",
                      "one-rank TimeShardedNode vs one device": "passed"}, result
    assert result["emulated"] and result["device"] == "cpu"
    assert "N=4,194,304" in result["stages"][1]["detail"]
    assert "NCCL_ERROR_INVALID_USAGE" in result["stages"][2]["detail"], result["stages"][2]


def test_self_receive_stage_fails_when_the_receive_is_queued_instead(monkeypatch):
    """Stage 3 must tell NCCL's refusal from a receive that waited for its timeout: here the
    emulation accepts a lone receive from itself (as it did before it followed NCCL)."""
    from sj_temporal_fusion.distributed import smoke
    monkeypatch.setattr(emu, "_launch", _launch_without_refusal)
    _one_rank_group()
    with pytest.raises(AssertionError, match="other than NCCL's refusal"):
        smoke.stage_self_receive_refused(torch.device("cpu"), 0, emu.nccl_transport, timeout=0.5)


def _launch_without_refusal(ops):
    for op in ops:
        emu._STREAMS[op.stream].ops.append(op)
        if not op.to_self():
            op.issue()


def _one_rank_group():
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


@pytest.fixture(autouse=True)
def _leave_no_group():
    """A test that fails half-way must not leave its process group to the next one."""
    yield
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def test_kernel_comparison_runs_on_the_host_build():
    import sj_temporal_fusion  # noqa: F401
    from sj_temporal_fusion.distributed import smoke
    assert smoke.compare_kernels(torch.device("cpu")).startswith("24 configurations")


def test_a_failing_stage_fails_the_run(monkeypatch):
    from sj_temporal_fusion.distributed import smoke

    def broken(device, n, make_nccl):
        raise AssertionError("deliberately broken")

    monkeypatch.setattr(smoke, "STAGES", [("broken", broken)])
    monkeypatch.setattr(smoke, "_ensure_group", lambda device: None)
    result = smoke.run("cpu", make_nccl=emu.nccl_transport, log=lambda line: None)
    assert not result["ok"] and result["stages"][0]["status"] == "failed"
    assert "deliberately broken" in result["stages"][0]["detail"]


def test_a_cpu_device_without_an_nccl_maker_is_refused():
    from sj_temporal_fusion.distributed import smoke
    with pytest.raises(SystemExit, match="make_nccl"):
        smoke.run("cpu", log=lambda line: None)


@pytest.mark.slow  # ranks in subprocesses
def test_ranks_cpu_run_under_torchrun(tmp_path):
    """The stages that need two or more GPUs, as torchrun runs them, on two CPU processes (gloo
    for the torch engine, the NCCL emulation for the CuPy engine)."""
    out = tmp_path / "ranks.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                           "--standalone", "--nproc-per-node", "2", ON_CPU, "--ranks", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["ranks"] == 2 and len(result["stages"]) == 8
    assert all(s["status"] == "passed" for s in result["stages"]), result


def _one_passing_stage(monkeypatch):
    from sj_temporal_fusion.distributed import smoke
    monkeypatch.setattr(smoke, "STAGES", [("trivial", lambda device, n, make_nccl: "ok")])
    return smoke


def test_the_run_destroys_the_process_group_it_joined(monkeypatch, capsys):
    """A process that exits with its gloo group alive can abort in std::terminate (see
    smoke.leave_group), so the command leaves none behind."""
    import torch.distributed as dist
    smoke = _one_passing_stage(monkeypatch)
    assert not dist.is_initialized()
    assert smoke.main(["--device", "cpu"], make_nccl=emu.nccl_transport) == 0
    assert not dist.is_initialized()


def test_the_run_leaves_a_callers_process_group_alone(monkeypatch, capsys):
    import torch.distributed as dist
    smoke = _one_passing_stage(monkeypatch)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert smoke.main(["--device", "cpu"], make_nccl=emu.nccl_transport) == 0
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
