"""GPU build. CI (no GPU) checks the launcher's compile (``_nvrtc``: NVRTC through CuPy's
bindings, straight to sm_XY machine code; every variant's compile is tests/test_sass.py's); the
tests marked gpu run the kernels on a CUDA device against the host build, SpikingJelly's cupy
backend and PyTorch's stream semantics (skipped, saying why, where there is no CUDA device)."""
import pytest
import torch
from spikingjelly.activation_based import neuron, surrogate

import sj_temporal_fusion  # noqa: F401
from sj_temporal_fusion import _nvrtc, ops
from sj_temporal_fusion.compat import numpy_int_alias
from sj_temporal_fusion.functional import lif_multi_step
from sj_temporal_fusion.neurons import REGISTRY

from _grid import DTYPES, RESETS, assert_grad_close, grad_tolerance, near_threshold_mismatches
from conftest import require_nvrtc


def _forward_name():
    from sj_temporal_fusion.variants import forward_variant
    return forward_variant(REGISTRY["lif"], torch.float32, 7 | 8)  # v * keep + x, hard reset


def test_compile_options_and_cubin():
    """The options are the launcher's with -ftz=false (fp32 subnormals kept, as on the host; CuPy's
    RawModule would add -ftz=true), and the result is sm_90 machine code (ELF)."""
    require_nvrtc()
    options = _nvrtc.compile_options(_nvrtc.OPTIONS, "90", verbose=True)
    assert set(_nvrtc.OPTIONS) <= set(options) and "-ftz=false" in options and "-ftz=true" not in options
    name = _forward_name()
    cubin, mapping, log = _nvrtc.compile_cubin(_nvrtc.source(), _nvrtc.OPTIONS, [name], "90", verbose=True)
    assert cubin[:4] == b"\x7fELF" and mapping[name].startswith("_Z") and "sm_90" in log


def test_nvrtc_build_does_not_contract_fma():
    """--fmad=false: the forward kernel's PTX has no fused multiply-add, so it rounds like g++
    with -ffp-contract=off and the two builds agree bit for bit."""
    nvrtc = require_nvrtc()
    prog = nvrtc.createProgram(_nvrtc.source(), "variant.cu", [], [])
    name = _forward_name()
    nvrtc.addNameExpression(prog, name)
    nvrtc.compileProgram(prog, list(_nvrtc.OPTIONS) + ["--gpu-architecture=compute_90"])
    ptx = nvrtc.getPTX(prog).decode()
    assert "fma.rn.f32" not in ptx and "mad.f32" not in ptx and ".ftz" not in ptx


# ---------------------------------------------------------------- on a CUDA device

def _pair(kind, dtype, v_reset, requires_grad=True, T=37, N=4099):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(T, N, generator=g) * 0.8 + 0.3).to(dtype)
    return x.clone().requires_grad_(requires_grad), x.cuda().requires_grad_(requires_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["if", "lif", "plif"])
@pytest.mark.parametrize("v_reset", RESETS)
def test_gpu_matches_host_bitwise_forward(dtype, kind, v_reset):
    x_cpu, x_gpu = _pair(kind, dtype, v_reset)
    w = torch.tensor(-0.3)
    options = dict(kind=kind, tau=1.7, decay_input=False, v_threshold=0.4, v_reset=v_reset, store_v_seq=True,
                   surrogate_function=surrogate.ATan(alpha=2.5))
    s_c, v_c, vs_c = lif_multi_step(x_cpu, w=w.requires_grad_(), **options)
    s_g, v_g, vs_g = lif_multi_step(x_gpu, w=w.cuda(), **options)
    assert torch.equal(s_g.cpu(), s_c) and torch.equal(v_g.cpu(), v_c) and torch.equal(vs_g.cpu(), vs_c)
    g = torch.randn_like(s_c)
    gx_c, = torch.autograd.grad((s_c * g).sum() + vs_c.float().square().sum(), x_cpu)
    gx_g, = torch.autograd.grad((s_g * g.cuda()).sum() + vs_g.float().square().sum(), x_gpu)
    # Rational surrogates give identical gradients; exp/atan differ by an ulp between libm and CUDA.
    assert_grad_close(gx_g.cpu(), gx_c, dtype, "grad x, GPU vs host")


@pytest.mark.gpu
@pytest.mark.parametrize("T", [4, 32, 100])
def test_gpu_matches_spikingjelly_cupy_backend(T):
    """SpikingJelly's own CUDA kernels (fp32) against ours on the same layer."""
    pytest.importorskip("cupy")
    options = dict(tau=1.25, decay_input=False, v_threshold=0.3, v_reset=0.0,
                   surrogate_function=surrogate.Sigmoid(alpha=4.0), step_mode="m")
    theirs = neuron.LIFNode(backend="cupy", **options).cuda()
    ours = neuron.LIFNode(backend="temporal_fusion", **options).cuda()
    x = (torch.randn(T, 64, 1000, device="cuda") * 0.3 + 0.12).requires_grad_()
    with numpy_int_alias():  # SpikingJelly 0.0.0.0.14's cupy backend uses np.int (compat)
        y_theirs = theirs(x)
    y_ours = ours(x)
    h_exact = None
    with torch.no_grad():
        from sj_temporal_fusion.reference import lif_reference
        _, _, v64 = lif_reference(x.double(), kind="lif", store_v_seq=True, tau=1.25, decay_input=False,
                                  v_threshold=0.3, v_reset=0.0)
        h_exact = torch.cat([torch.zeros_like(v64[:1]), v64[:-1]]) * (1 - 1 / 1.25) + x.double()
    explained, unexplained = near_threshold_mismatches(y_ours.double(), y_theirs.double(), h_exact, 0.3,
                                                       torch.float32)
    assert unexplained == 0 and explained <= 0.001 * 64000
    if explained == 0:
        with numpy_int_alias():
            g_theirs, = torch.autograd.grad(y_theirs.sum(), x)
        g_ours, = torch.autograd.grad(y_ours.sum(), x)
        assert_grad_close(g_ours, g_theirs, torch.float32, "grad x vs cupy backend")


@pytest.mark.gpu
def test_gpu_launches_on_the_current_stream():
    """The input is written on a side stream right after a long sleep; reading it on any other
    stream would see stale data."""
    x_src = torch.randn(16, 1 << 16, device="cuda") + 0.5
    expected = lif_multi_step(x_src, tau=1.5, v_threshold=0.6)[0]
    x = torch.zeros_like(x_src)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        x.copy_(x_src)
        out = lif_multi_step(x, tau=1.5, v_threshold=0.6)[0]
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, expected)


@pytest.mark.gpu
def test_gpu_launch_count_and_no_fallback(monkeypatch):
    calls = []
    original = ops.launch
    monkeypatch.setattr(ops, "launch", lambda *a: (calls.append(a[0].split("<")[0]), original(*a)))
    node = neuron.LIFNode(step_mode="m", backend="temporal_fusion").cuda()
    x = torch.randn(8, 4, 100, device="cuda", requires_grad=True)
    node(x).sum().backward()
    assert calls == ["neuron_forward", "neuron_backward"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_second_device():
    x = torch.randn(9, 333, device="cuda:1")
    s1 = lif_multi_step(x)[0]
    s0 = lif_multi_step(x.to("cuda:0"))[0]
    assert s1.device.index == 1 and torch.equal(s1.cpu(), s0.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", list(REGISTRY))
def test_gpu_matches_host_every_model(model, dtype):
    """Every model on the GPU against the host build: forward bit for bit (EIF to rounding: CUDA's
    expf is not glibc's), gradients (the learnable parameters' too) to rounding."""
    from sj_temporal_fusion.functional import neuron_multi_step
    from _models import MODELS
    mc = MODELS[model]
    options = dict(mc.fixed, **{k: v[-1] for k, v in mc.grid.items()})
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(29, 3001, generator=g) * mc.x_scale + mc.x_shift).to(dtype)
    results = []
    for device in ("cpu", "cuda"):
        learn = {k: v.detach().to(device).requires_grad_() for k, v in mc.learnable(options).items()}
        xd = x.to(device).requires_grad_()
        spike, z, v_seq = neuron_multi_step(xd, model=model, store_v_seq=True, **options, **learn)
        loss = (spike.float() * torch.linspace(0, 1, spike.shape[-1], device=device)).sum() + v_seq.float().square().sum()
        grads = torch.autograd.grad(loss, [xd, *learn.values()])
        results.append(([spike, *z, v_seq], grads))
    (outs_c, grads_c), (outs_g, grads_g) = results
    for a, b in zip(outs_g, outs_c):
        if mc.exact:
            assert torch.equal(a.cpu(), b)
        else:
            # Computed in float and rounded once to dtype, like the gradients: a last-bit
            # difference in expf moves an fp16/bf16 output by one of its own ulps.
            torch.testing.assert_close(a.cpu().float(), b.float(), **grad_tolerance(dtype))
    for a, b in zip(grads_g, grads_c):
        assert_grad_close(a.cpu(), b, dtype if a.dtype == dtype else torch.float32, "grad, GPU vs host")
