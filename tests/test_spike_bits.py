"""Spikes stored as bits (sj_temporal_fusion/optimize/spike_bits.py): exact restoration, packing only of
tensors known to be spikes, and gradients bit for bit those of a run without the hooks."""
import pytest
import torch

from sj_temporal_fusion.optimize import spike_bits
from sj_temporal_fusion.optimize.spike_bits import PackedSpikes

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` in logical order: equal bytes mean equal values, signs of zero
    included."""
    return t.reshape(-1).view(torch.uint8)


def random_spikes(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < 0.3).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "sliced_dense"])
def test_round_trip_is_bitwise_with_strides(dtype, layout):
    # (5, 3, 7, 11) = 1155 elements: not a multiple of 8, so the last byte is partial.
    t = random_spikes((5, 3, 7, 11), dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        t = t.transpose(0, 2)
    elif layout == "sliced_dense":
        t = random_spikes((9, 3, 7, 11), dtype)[2:7]  # storage offset, dense
    order = spike_bits._memory_order(t)
    assert order is not None
    packed = PackedSpikes(t, order)
    assert packed.bits.dtype == torch.uint8 and packed.bits.numel() == (t.numel() + 7) // 8
    restored = packed.unpack()
    assert restored.dtype == t.dtype and restored.shape == t.shape and restored.stride() == t.stride()
    assert torch.equal(bits_of(restored), bits_of(t))


def test_overlapping_or_gapped_views_are_not_packable():
    t = random_spikes((8, 10), torch.float32)
    assert spike_bits._memory_order(t[:, ::2]) is None
    assert spike_bits._memory_order(t[:1].expand(4, 10)) is None


def test_bit_order_matches_numpy_and_torch_paths():
    # The CUDA path uses torch ops, the CPU path NumPy: the same bytes, element i in bit i % 8.
    flat = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert spike_bits.pack_bits(flat).tolist() == [0b10000001, 0b11]
    assert spike_bits.pack_bits_torch(flat).tolist() == [0b10000001, 0b11]
    g = torch.Generator().manual_seed(3)
    for n in (1, 7, 8, 9, 1003):
        flat = torch.rand(n, generator=g) < 0.4
        packed = spike_bits.pack_bits(flat)
        assert torch.equal(spike_bits.pack_bits_torch(flat), packed)
        assert torch.equal(spike_bits.unpack_bits(packed, n), flat.to(torch.uint8))
        assert torch.equal(spike_bits.unpack_bits_torch(packed, n), flat.to(torch.uint8))


def test_only_tagged_tensors_are_packed():
    w = torch.randn(64, requires_grad=True)
    plain = random_spikes((64,), torch.float32)  # 0/1 values, but nothing says they are spikes
    with spike_bits.saving() as registry:
        (plain * w).sum()
    assert registry.counts["packed"] == 0

    tagged = random_spikes((64,), torch.float32)
    with spike_bits.saving() as registry:
        spike_bits.tag(tagged)
        out = tagged.view(8, 8).reshape(64) * w  # a view of a tagged tensor is known too
    assert registry.counts["packed"] == 1 and registry.counts["packed_bytes"] == 8
    out.sum().backward()
    assert torch.equal(w.grad, tagged)


def test_in_place_change_or_dtype_view_after_tagging_is_not_packed():
    w = torch.randn(64, requires_grad=True)
    with spike_bits.saving() as registry:
        s = random_spikes((64,), torch.float32)
        spike_bits.tag(s)
        s.mul_(2)  # no longer spikes
        s * w
        r = random_spikes((64,), torch.float32)
        spike_bits.tag(r)
        r.view(torch.int32).float() * w  # a reinterpretation, a new tensor: not tagged
    assert registry.counts["packed"] == 0


def test_dead_tag_is_ignored():
    with spike_bits.saving() as registry:
        s = random_spikes((64,), torch.float32)
        spike_bits.tag(s)
        ptr = s.untyped_storage().data_ptr()
        del s
        assert not any(tag.ref() is not None for tag in registry.tags[ptr])


def test_session_closes_and_outside_nothing_is_tagged():
    assert not spike_bits.active()
    with spike_bits.saving():
        assert spike_bits.active()
    assert not spike_bits.active()
    s = random_spikes((8,), torch.float32)
    spike_bits.tag(s)  # outside a session: a no-op
    assert not spike_bits.is_tagged(s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_neuron_spikes_are_exactly_plus_zero_and_one(dtype):
    # What exactness rests on: the kernel writes +0.0 or 1.0, never -0.0 or anything else, so
    # the bits restore the spike tensor byte for byte.
    import sj_temporal_fusion  # noqa: F401 - registers the backend
    from spikingjelly.activation_based import neuron, surrogate
    node = neuron.LIFNode(tau=1.25, decay_input=False, v_threshold=0.3, step_mode="m",
                          surrogate_function=surrogate.Sigmoid(alpha=4.), backend="temporal_fusion")
    g = torch.Generator().manual_seed(5)
    x = (0.3 + 0.5 * torch.randn(13, 7, 19, generator=g)).to(dtype).requires_grad_()
    s = node(x)
    assert 0 < s.float().mean().item() < 1
    assert torch.equal(bits_of(s.detach()), bits_of((s.detach() != 0).to(dtype)))


def test_freed_spikes_whose_memory_is_reused_are_not_confused():
    # With spike bits a spike tensor is freed as soon as its readers are done (only its bits
    # are kept), and the next spike tensor of the same shape often gets the same address: a
    # packed copy must never be looked up by address alone.
    w = torch.randn(4096, requires_grad=True)
    expected, losses, addresses = torch.zeros(4096), [], []
    with spike_bits.saving() as registry:
        for i in range(12):
            s = random_spikes((4096,), torch.float32, seed=i)
            spike_bits.tag(s)
            addresses.append(s.data_ptr())
            losses.append((s * w).sum())  # saves s for w's gradient
            expected += s
            del s
    assert registry.counts["packed"] == 12
    assert len(set(addresses)) < len(addresses), "the allocator reused no address: nothing tested"
    torch.stack(losses).sum().backward()
    assert torch.equal(w.grad, expected)
