"""bench tune (sj_temporal_fusion/bench/tune.py): shapes the kernels cannot launch are skipped
with the ptxas register count, decided on the CPU from the compiled sm_90 machine code."""
import pytest
import torch

from sj_temporal_fusion import _cuda, _sass
from sj_temporal_fusion.bench import tune
from conftest import require_nvrtc


def test_a_shape_beyond_the_register_file_is_refused_with_the_reason():
    heavy = _sass.KernelResources("neuron_backward<LifModel, float, 2, 0, false, false, false>", "90", 174, 0, 0, 0)
    light = _sass.KernelResources("neuron_forward<LifModel, float, 0>", "90", 31, 0, 0, 0)
    reason = tune.launch_problem(512, [light, heavy])
    assert reason == ("neuron_backward<LifModel, float, 2, 0, false, false, false> uses 174 registers (ptxas, sm_90): 512 threads need "
                      "90,112 > 65,536 registers per SM")
    assert tune.launch_problem(256, [light, heavy]) is None


@pytest.mark.slow  # NVRTC compiles
def test_launch_problem_follows_the_compiled_registers_of_each_shape():
    """Real compile of the training kernels at 4 lanes (the issue's 174-register case) for sm_90."""
    require_nvrtc()
    names = tune.launched_kernels("train", torch.float32)
    assert len(names) == 2 and names[1].startswith("neuron_backward")
    with tune.launch_shape(torch.device("cuda"), 512, 4):
        assert "-DTF_LANES=4" in _cuda.OPTIONS and "-DTF_BLOCK=512" in _cuda.OPTIONS
        resources = tune.kernel_resources(names, "90")
    assert "-DTF_LANES=4" not in _cuda.OPTIONS  # the shipped shape is restored
    for block in tune.CUDA_BLOCKS:
        problem = tune.launch_problem(block, resources)
        assert (problem is None) == all(_sass.fits(r.registers, block) for r in resources), (block, problem)
    backward, shipped = resources[1], tune.kernel_resources(names, "90")[1]
    # more lanes need more storage: registers, or (bounded by __launch_bounds__) local memory
    assert backward.registers > shipped.registers or backward.uses_local_memory
