"""The single-GPU smoke run (sj_temporal_fusion/distributed/smoke.py): its CPU dry run, as one
command under -W error::DeprecationWarning, and its kernel comparison's calls on the host build.
The GPU run itself is `python -W error::DeprecationWarning -m sj_temporal_fusion.distributed.smoke`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_passes_as_one_command(tmp_path):
    out = tmp_path / "smoke.json"
    done = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-m",
                           "sj_temporal_fusion.distributed.smoke", "--dry-run", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    status = {s["name"]: s["status"] for s in result["stages"]}
    assert status == {"shard kernels: CUDA vs host build": "skipped",
                      "one-rank NCCL communicator: send/recv to itself": "passed",
                      "lone receive times out and raises": "passed",
                      "one-rank TimeShardedNode vs one device": "passed"}, result
    assert "N=4,194,304" in result["stages"][1]["detail"]


def test_kernel_comparison_runs_on_the_host_build():
    import sj_temporal_fusion  # noqa: F401
    from sj_temporal_fusion.distributed import smoke
    assert smoke.compare_kernels(torch.device("cpu")).startswith("24 configurations")


def test_a_failing_stage_fails_the_run(monkeypatch):
    from sj_temporal_fusion.distributed import smoke

    def broken(device, dry_run, n):
        raise AssertionError("deliberately broken")

    monkeypatch.setattr(smoke, "STAGES", [("broken", broken)])
    monkeypatch.setattr(smoke, "_ensure_group", lambda device: None)
    result = smoke.run(dry_run=True, log=lambda line: None)
    assert not result["ok"] and result["stages"][0]["status"] == "failed"
    assert "deliberately broken" in result["stages"][0]["detail"]


def test_ranks_dry_run_under_torchrun(tmp_path):
    """The stages that need two or more GPUs, as torchrun runs them, on two CPU processes (gloo
    for the torch engine, the NCCL emulation for the CuPy engine)."""
    out = tmp_path / "ranks.json"
    done = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-m", "torch.distributed.run",
                           "--standalone", "--nproc-per-node", "2", "-m", "sj_temporal_fusion.distributed.smoke",
                           "--ranks", "--dry-run", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["ranks"] == 2 and len(result["stages"]) == 8
    assert all(s["status"] == "passed" for s in result["stages"]), result


def _one_passing_stage(monkeypatch):
    from sj_temporal_fusion.distributed import smoke
    monkeypatch.setattr(smoke, "STAGES", [("trivial", lambda device, dry_run, n: "ok")])
    return smoke


def test_the_run_destroys_the_process_group_it_joined(monkeypatch, capsys):
    """A process that exits with its gloo group alive can abort in std::terminate (see
    smoke.leave_group), so the command leaves none behind."""
    import torch.distributed as dist
    smoke = _one_passing_stage(monkeypatch)
    assert not dist.is_initialized()
    assert smoke.main(["--dry-run"]) == 0
    assert not dist.is_initialized()


def test_the_run_leaves_a_callers_process_group_alone(monkeypatch, capsys):
    import torch.distributed as dist
    smoke = _one_passing_stage(monkeypatch)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert smoke.main(["--dry-run"]) == 0
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
