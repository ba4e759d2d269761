"""The GPU kernels' machine code has the shape the design asks for, checked without a GPU: each
variant compiled by NVRTC to PTX (the launcher's options), by ptxas to sm_90 SASS and read back
with cuobjdump (the CUDA toolkit's, or the one in the triton wheel torch depends on).

- Loads issued ahead: a chunk's x loads are in flight together. The forward's longest run of
  global loads uninterrupted by floating-point work is at least the model's chunk (16 or 8
  steps); the backward's recompute at least 8. A loop that loads one step at a time has runs of
  one or two.
- No branch on the neuron's options: each FORM is its own variant, so options change the
  arithmetic only. The forward kernels of every FORM without a division have the same control
  flow (the same number of conditional branches) and none has an indirect branch (a switch's
  jump table). The division forms (SpikingJelly divides by tau) add only IEEE division's
  slow-path branch."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sj_temporal_fusion import _nvrtc
from sj_temporal_fusion.neurons import REGISTRY
from sj_temporal_fusion.variants import backward_variant, forward_variant
from conftest import require_nvrtc

FLOAT_WORK = ("FADD", "FMUL", "FFMA", "FSETP", "FSEL", "MUFU", "DADD", "DMUL", "DFMA", "DSETP", "F2F", "HADD2")
H_DIV = (1, 2, 3)  # lif.cuh's LIF_H_DIV_* charge formulas


def _tools():
    import triton
    wheel = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cuobjdump = shutil.which("cuobjdump") or str(wheel / "cuobjdump")
    # ptxas must read NVRTC's PTX version: the toolkit's matches; the wheel's may be older
    candidates = [shutil.which("ptxas"), *sorted(map(str, Path("/usr/local").glob("cuda*/bin/ptxas")), reverse=True),
                  str(wheel / "ptxas")]
    return [p for p in candidates if p and Path(p).exists()], cuobjdump


@pytest.fixture(scope="module")
def sass():
    nvrtc = require_nvrtc()
    ptxas_candidates, cuobjdump = _tools()
    if not Path(cuobjdump).exists():
        pytest.skip("no cuobjdump (CUDA toolkit or the triton wheel)")

    def compile_(name: str, tmp=Path(__import__("tempfile").mkdtemp())) -> list[tuple[str, str]]:
        prog = nvrtc.createProgram(_nvrtc.source(), "variant.cu", [], [])
        nvrtc.addNameExpression(prog, name)
        nvrtc.compileProgram(prog, list(_nvrtc.OPTIONS) + ["--ftz=false", "--gpu-architecture=compute_90"])
        (tmp / "k.ptx").write_bytes(nvrtc.getPTX(prog).rstrip(b"\0"))
        errors = []
        for ptxas in ptxas_candidates:
            r = subprocess.run([ptxas, "-arch=sm_90", str(tmp / "k.ptx"), "-o", str(tmp / "k.cubin")],
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
            errors.append(f"{ptxas}: {r.stderr.strip()}")
        else:
            pytest.skip(f"no ptxas here reads NVRTC's PTX: {errors}")
        out = subprocess.run([cuobjdump, "-sass", str(tmp / "k.cubin")], capture_output=True, text=True, check=True)
        ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", out.stdout)
        assert ops, f"cuobjdump printed no instructions for {name}"
        return ops
    return compile_


def longest_load_run(ops) -> int:
    best = run = 0
    for _, op in ops:
        if op.startswith("LDG"):
            run += 1
            best = max(best, run)
        elif op.split(".")[0] in FLOAT_WORK:
            run = 0
    return best


def conditional_branches(ops) -> int:
    return sum(1 for pred, op in ops if op.startswith("BRA") and pred)


@pytest.mark.parametrize("model", list(REGISTRY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_loads_a_chunk_ahead(sass, model, dtype):
    m = REGISTRY[model]
    ops = sass(forward_variant(m, dtype, m.forward_form(dict(m.defaults, **({"w": torch.zeros(())} if model == "lif" else {})))))
    assert longest_load_run(ops) >= m.chunk


def test_backward_recompute_loads_ahead(sass):
    m = REGISTRY["lif"]
    assert longest_load_run(sass(backward_variant(m, torch.float32, 2, 7 | 8, False))) >= 8


@pytest.mark.slow  # NVRTC compiles of many variants
def test_no_branch_on_the_options(sass):
    m = REGISTRY["lif"]
    counts = {}
    for form in sorted({f & ~m.detach_bit for f in m.forms}):
        ops = sass(forward_variant(m, torch.float32, form))
        assert not any(op.startswith("BRX") for _, op in ops), f"FORM {form}: an indirect branch (jump table)"
        counts[form] = conditional_branches(ops)
    plain = {f: c for f, c in counts.items() if f & 7 not in H_DIV}
    assert len(set(plain.values())) == 1, f"control flow differs between FORMs: {plain}"
    assert all(counts[f] >= counts[0] for f in counts if f & 7 in H_DIV)
