"""The package as pip delivers it: a wheel built from the tracked files, installed outside the
checkout, imported from there, with an empty kernel cache. An editable install reads csrc/ from the
checkout and so hides a wheel that lacks kernel sources; this test does not."""
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "sj_temporal_fusion" / "csrc"

# Runs in the installed copy: every registered model, forward and backward in fp64 on the CPU,
# against the pure-PyTorch reference (bit for bit forward, gradients to rounding).
CHECK_EVERY_MODEL = textwrap.dedent("""
    import sys, torch
    import sj_temporal_fusion
    from sj_temporal_fusion.functional import neuron_multi_step
    from sj_temporal_fusion.neurons import REGISTRY
    from sj_temporal_fusion.reference import neuron_reference
    assert sj_temporal_fusion.__file__.startswith(sys.argv[1]), sj_temporal_fusion.__file__
    for name in REGISTRY:
        x = (torch.randn(9, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.6)
        ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        spike, _, v_seq = neuron_multi_step(ours_x, model=name, store_v_seq=True)
        spike_ref, _, v_seq_ref = neuron_reference(ref_x, model=name, store_v_seq=True)
        assert torch.equal(spike, spike_ref) and spike.sum() > 0, name
        torch.testing.assert_close(v_seq, v_seq_ref, rtol=1e-12, atol=1e-12)
        (spike.sum() + v_seq.sum()).backward()
        (spike_ref.sum() + v_seq_ref.sum()).backward()
        torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=1e-10, atol=1e-12)
        print("ok", name)
""")


def _tracked_copy(dest: Path) -> Path:
    """The files git tracks (what a clone of main holds), copied to ``dest``; the whole tree
    without build outputs where there is no git."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in files.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
                 and not {".git", ".venv", "build", "__pycache__"} & set(p.relative_to(ROOT).parts)]
    for name in names:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _tracked_copy(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: build with this environment's setuptools, no download (CI and the GPU
    # machine may be offline).
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("sj_temporal_fusion-*.whl")
    return path


def test_wheel_holds_every_kernel_source(wheel):
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.startswith("sj_temporal_fusion/csrc/")}
    needed = {f"sj_temporal_fusion/csrc/{p.relative_to(CSRC).as_posix()}" for p in CSRC.rglob("*") if p.is_file()}
    assert needed and needed <= shipped, f"the wheel lacks {sorted(needed - shipped)}"


@pytest.mark.slow  # a wheel installed and run in a fresh venv
def test_installed_wheel_runs_every_model_from_an_empty_cache(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                           "--target", str(site), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Outside the checkout (cwd, PYTHONPATH) so nothing can import the checkout's copy; PYTHONPATH
    # comes before the editable install's finder.
    env = dict(os.environ, PYTHONPATH=str(site), SJ_TF_CACHE=str(tmp_path / "empty-cache"))
    proc = subprocess.run([sys.executable, "-c", CHECK_EVERY_MODEL, str(site)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    from sj_temporal_fusion.neurons import REGISTRY
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == [w for name in REGISTRY for w in ("ok", name)]
