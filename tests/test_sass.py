"""GPU resources checked without a GPU: every kernel variant compiled to sm_80 and sm_90 machine
code as the launcher's cubins are compiled (``_nvrtc``), with ptxas's registers, spills and stack
(``_sass``).

Fails on any spill or stack frame (local memory), and on a register count that drops occupancy
below 50% at ``_nvrtc.BLOCK`` threads per block for the fp32, fp16 and bf16 kernels (fp64 kernels
are exempt: fp64 is for exactness, not speed). How occupancy is computed: ``_sass.occupancy``
(65,536 registers and 2,048 threads per SM on sm_80 / sm_90, 256-register allocation per warp)."""
import pytest

from sj_temporal_fusion import _nvrtc, _sass
from conftest import require_nvrtc

FAST_DTYPES = ("float", "f16_t", "bf16_t")

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooIfEvv' for 'sm_90'
ptxas info    : Function properties for _Z3fooIfEvv
ptxas         .     32 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 68 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
ptxas info    : Function properties for _Z3barv
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 31 registers, used 0 barriers
"""


def test_occupancy_model():
    # 64 registers x 256 threads: 8 warps x 2,048 registers = 16,384 per block -> 4 blocks = 1,024 threads.
    assert _sass.occupancy(64, 256) == 0.5
    # 65 rounds up to 72: 18,432 per block -> 3 blocks = 768 threads.
    assert _sass.occupancy(65, 256) == 0.375
    assert _sass.occupancy(32, 256) == 1.0
    assert _sass.max_registers_for(0.5, 256) == 64
    # The tune defect: 174 registers (176 allocated) x 512 threads = 90,112 > 65,536: cannot launch.
    assert not _sass.fits(174, 512) and _sass.occupancy(174, 512) == 0.0
    assert _sass.fits(96, 512) and _sass.fits(255, 256) and not _sass.fits(255, 512)
    assert not _sass.fits(32, 2048)  # more than 1,024 threads per block


def test_ptxas_report_is_parsed():
    rows = _sass.parse_ptxas_log(PTXAS_LOG, {"foo<float>": "_Z3fooIfEvv"}, "90")
    assert [(r.name, r.registers, r.stack_bytes, r.spill_store_bytes, r.spill_load_bytes) for r in rows] == [
        ("foo<float>", 68, 32, 8, 4), ("_Z3barv", 31, 0, 0, 0)]
    assert rows[0].uses_local_memory and not rows[1].uses_local_memory
    assert _sass.dtype_of("neuron_backward<LifModel, bf16_t, 2, 0, true, false, true>") == "bf16_t"


@pytest.fixture(scope="module")
def per_arch(package_resources):
    return package_resources


@pytest.mark.slow  # every variant through NVRTC and ptxas for two architectures: minutes
def test_every_variant_is_compiled_for_both_architectures(per_arch):
    """Every variant compiled as the launcher's cubins are (``_nvrtc.compile_cubin``: the build's
    options, -ftz=false, NVRTC straight to sm_XY machine code), for sm_80 and sm_90. At run time
    each variant compiles alone, for the device's own architecture, and is cached on disk."""
    names = _nvrtc.all_name_expressions()
    assert len(names) >= 4 * 14
    assert set(per_arch) == {"80", "90"}
    for arch, rows in per_arch.items():
        assert [r.name for r in rows] == names
        assert all(r.arch == arch and r.mangled.startswith("_Z") and r.registers > 0 for r in rows)


def _uses_local_memory(r) -> bool:
    """Spills anywhere; a stack frame in the fp32 / fp16 / bf16 kernels. fp64 kernels (for
    exactness, not speed, and unbounded in registers) may keep a small frame: the time-sharding
    backward in fp64 calls libdevice's double-precision division out of line (8 bytes)."""
    spills = r.spill_store_bytes > 0 or r.spill_load_bytes > 0
    return spills or (r.stack_bytes > 0 and (_sass.dtype_of(r.name) in FAST_DTYPES or r.stack_bytes > 8))


@pytest.mark.slow  # every variant through NVRTC and ptxas for two architectures: minutes
@pytest.mark.parametrize("arch", _sass.ARCHS)
def test_no_spills_or_local_memory(per_arch, arch):
    bad = [f"{r.name}: {r.stack_bytes} B stack, {r.spill_store_bytes} B spill stores, "
           f"{r.spill_load_bytes} B spill loads" for r in per_arch[arch] if _uses_local_memory(r)]
    assert not bad, f"sm_{arch}: local memory in {len(bad)} variants:\n" + "\n".join(bad)


def _floor(name: str) -> float:
    """The occupancy a variant is bounded for (csrc/temporal.cu's __launch_bounds__): 50%, and
    37.5% for the backward with parameter gradients (PLIF's w, KLIF's k, a learnable threshold),
    which keeps a chunk's states, inputs and pre-spike values live at once and would spill at 64
    registers."""
    return 0.375 if _sass.param_grads_of(name) else _sass.MIN_OCCUPANCY


def test_parameter_gradient_variants_are_recognised():
    assert _sass.param_grads_of("neuron_backward<LifModel, float, 2, 5, true>")
    assert _sass.param_grads_of("neuron_backward<LifModel, float, 2, 5, true, false, true>")
    assert not _sass.param_grads_of("neuron_backward<LifModel, float, 2, 5, false, true>")
    assert not _sass.param_grads_of("neuron_forward<LifModel, float, 5>")


@pytest.mark.slow  # every variant through NVRTC and ptxas for two architectures: minutes
@pytest.mark.parametrize("arch", _sass.ARCHS)
def test_registers_keep_half_occupancy(per_arch, arch):
    limit = _sass.max_registers_for(_sass.MIN_OCCUPANCY, _nvrtc.BLOCK)
    bad = [f"{r.name}: {r.registers} registers -> {_sass.occupancy(r.registers, _nvrtc.BLOCK):.1%}"
           for r in per_arch[arch]
           if _sass.dtype_of(r.name) in FAST_DTYPES and _sass.occupancy(r.registers, _nvrtc.BLOCK) < _floor(r.name)]
    assert not bad, (f"sm_{arch}, block {_nvrtc.BLOCK}: above {limit} registers occupancy drops below "
                     f"{_sass.MIN_OCCUPANCY:.0%}:\n" + "\n".join(bad))
