"""The kernels' fp16 / bf16 conversions (csrc/common/fp.cuh: integer and fp32 arithmetic with
selects on the host, PTX cvt on the GPU) against PyTorch's, exhaustively for every half and over
many floats, through the real kernel path: an IF neuron writes its fp32 state, rounded to the
input dtype, as v_seq. So v_seq[0] with x = 0 tests float -> half for any fp32 initial state, and
x alone (initial state 0) tests half -> float -> half. The expected values are the reference
neuron's in fp32 (the same arithmetic, bit for bit), rounded by PyTorch."""
import pytest
import torch

from sj_temporal_fusion import _host
from sj_temporal_fusion.functional import neuron_multi_step
from sj_temporal_fusion.reference import neuron_reference

IF = dict(model="lif", kind="if", v_threshold=3.0e38, v_reset=None, store_v_seq=True)


def _ours_and_expected(x: torch.Tensor, v_init: torch.Tensor, dtype: torch.dtype):
    ours = neuron_multi_step(x, (v_init,), **IF)[2][0]
    expected = neuron_reference(x.float(), (v_init,), **IF)[2][0].to(dtype)
    return ours, expected


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = torch.int16
    nan = a.isnan()
    return bool(torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(bits), b[~nan].view(bits)))


@pytest.mark.parametrize("emulate_gpu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_half_round_trips(dtype, emulate_gpu):
    halves = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    with _host.emulate_gpu_shape() if emulate_gpu else _nullcontext():
        ours, expected = _ours_and_expected(halves.reshape(1, -1), torch.zeros(halves.shape), dtype)
    assert _same(ours, expected)
    keep = (halves != 0) & ~halves.isnan() & (halves.float() < IF["v_threshold"])  # no spike, no reset
    assert _same(expected[keep], halves[keep])  # so the test saw every half


@pytest.mark.parametrize("emulate_gpu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_floats_round_to_nearest_even(dtype, emulate_gpu):
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(1 << 31), (1 << 31) - 1, (2_000_000,), generator=g, dtype=torch.int64).to(torch.int32)
    floats = bits.view(torch.float32)
    finfo = torch.finfo(dtype)
    edges = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), finfo.max, -finfo.max, finfo.tiny, finfo.eps,
                          65504.0, 65519.99, 65520.0, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.0000001, 1e-40,
                          3.4028235e38, 1.0 + 2.0 ** -11, 1.0 + 2.0 ** -8], dtype=torch.float32)
    floats = torch.cat([edges, floats, floats * 2.0 ** -100, floats * 2.0 ** 100])
    with _host.emulate_gpu_shape() if emulate_gpu else _nullcontext():
        ours, expected = _ours_and_expected(torch.zeros((1,) + floats.shape, dtype=dtype), floats, dtype)
    assert _same(ours, expected)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
