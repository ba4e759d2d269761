"""Spikes stored as bits: saved-tensor hooks that keep a spike tensor, saved by a later layer for
its backward (a convolution or linear layer saves its input for the weight gradient), as 1 bit
per element, and restore it exactly when the backward unpacks it.

Only tensors *known* to be spikes are packed, never guessed from their values:
    * :func:`tag` records a tensor produced by a ``temporal_fusion`` neuron (the kernel writes
      exactly +0.0 and 1.0) with its storage, dtype and in-place version counter;
    * :func:`tag_selection` records the output of a value-selecting layer (max pooling) whose
      input was tagged: each output element is a copy of an input element.
A saved tensor is packed when it lies in the storage of a live tagged tensor, has its dtype, and
neither has been written in place since it was tagged (views share the version counter). Any
other tensor (a cast copy under autocast, SEW's spike sums, membrane potentials) is saved as is.
So the restored tensor equals the saved one bit for bit, shape, strides and dtype included, and
gradients are those of a run without the hooks, bit for bit.

Memory: a (T, B, C, H, W) fp32 spike tensor of n elements is kept as ceil(n / 8) bytes (1/32).
Time: packing reads the tensor once (``!= 0``) and writes n / 8 bytes; unpacking writes the
tensor once. On CPU, NumPy's packbits / unpackbits do the bit shuffling (3-4x faster than the
equivalent torch ops on the 2-core CI machine, measured on 1.6 M elements: 7.6 vs 27 ms).

Use it through :func:`sj_temporal_fusion.optimize` (``attach`` below: forward hooks that open a
session around each forward pass with gradients and tag the neurons' and max-pooling layers'
outputs), or directly::

    with spike_bits.saving():          # spikes tagged inside are saved as bits
        loss = net(x).sum()            # the neurons' outputs must be tagged: optimize() does it
    loss.backward()
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

_state = threading.local()


@dataclass
class _Tag:
    ref: weakref.ref      # the tagged tensor; dead means its storage may have been reused
    version: int          # its in-place version counter when tagged
    dtype: torch.dtype


class _Registry:
    """Tags of the current forward pass (per thread), keyed by storage address."""

    def __init__(self):
        self.tags: dict[int, list[_Tag]] = {}
        self.packed: dict[tuple, "PackedSpikes"] = {}  # one packed copy per (tag, view)
        self.counts = {"packed": 0, "reused": 0, "kept": 0, "packed_bytes": 0, "saved_bytes": 0}

    def add(self, t: Tensor) -> None:
        if t.numel() == 0 or not t.is_floating_point():
            return
        self.tags.setdefault(t.untyped_storage().data_ptr(), []).append(
            _Tag(weakref.ref(t), t._version, t.dtype))

    def source_of(self, t: Tensor) -> Optional[_Tag]:
        """The tag of the live tensor whose storage ``t`` views, when ``t`` has its dtype and
        neither was written in place since tagging; else None. While the tagged tensor lives its
        storage cannot be reused, so the address identifies it; a dead tag never matches."""
        if t.numel() == 0 or t.layout != torch.strided:
            return None
        for tag in self.tags.get(t.untyped_storage().data_ptr(), ()):
            source = tag.ref()
            if (source is not None and tag.dtype == t.dtype and source._version == tag.version
                    and t._version == tag.version
                    and source.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()):
                return tag
        return None

    def known_spikes(self, t: Tensor) -> bool:
        return self.source_of(t) is not None


def _registry() -> Optional[_Registry]:
    return getattr(_state, "registry", None)


def active() -> bool:
    """Whether a :func:`saving` context is open on this thread."""
    return _registry() is not None


def tag(t: Tensor) -> None:
    """Record ``t`` as a spike tensor (values exactly +0.0 or 1.0). Only for outputs of this
    package's neurons; a no-op outside :func:`saving`."""
    registry = _registry()
    if registry is not None and isinstance(t, Tensor):
        registry.add(t)


def is_tagged(t: Tensor) -> bool:
    registry = _registry()
    return registry is not None and isinstance(t, Tensor) and registry.known_spikes(t)


def tag_selection(source: Tensor, out: Tensor) -> None:
    """Tag ``out`` when every element of it is a copy of an element of the tagged ``source``
    (max pooling): the values stay in {+0.0, 1.0}."""
    if is_tagged(source) and isinstance(out, Tensor) and out.dtype == source.dtype:
        tag(out)


# ---------------------------------------------------------------- packing

_SHIFTS: dict = {}


def _shifts(device: torch.device) -> Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def _memory_order(t: Tensor) -> Optional[tuple[int, ...]]:
    """The permutation that makes a dense, non-overlapping ``t`` contiguous (None otherwise), so
    that the bits follow the tensor's memory order and the restored tensor gets its strides."""
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d))))
    if t.permute(order).is_contiguous():
        return order
    return None


def pack_bits(flat_bool: Tensor) -> Tensor:
    """(n,) bool -> (ceil(n / 8),) uint8, element i in bit i % 8 of byte i // 8."""
    if flat_bool.device.type == "cpu":
        import numpy as np
        return torch.from_numpy(np.packbits(flat_bool.numpy(), bitorder="little"))
    return pack_bits_torch(flat_bool)


def unpack_bits(bits: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: (n,) uint8 of 0 / 1."""
    if bits.device.type == "cpu":
        import numpy as np
        return torch.from_numpy(np.unpackbits(bits.numpy(), bitorder="little", count=n))
    return unpack_bits_torch(bits, n)


def pack_bits_torch(flat_bool: Tensor) -> Tensor:
    """:func:`pack_bits` in torch ops (the CUDA path; tested on the CPU against NumPy's)."""
    n = flat_bool.numel()
    padded = torch.nn.functional.pad(flat_bool.view(torch.uint8), (0, (-n) % 8))
    # Distinct powers of two: the uint8 sum is an OR, at most 255.
    return (padded.view(-1, 8) << _shifts(flat_bool.device)).sum(1, dtype=torch.uint8)


def unpack_bits_torch(bits: Tensor, n: int) -> Tensor:
    return ((bits.unsqueeze(1) >> _shifts(bits.device)) & 1).view(-1)[:n]


class PackedSpikes:
    """A spike tensor kept as bits: ``unpack()`` gives a tensor equal to the original bit for bit
    (values, dtype, shape and strides)."""

    __slots__ = ("bits", "shape", "stride", "dtype", "numel")

    def __init__(self, t: Tensor, order: tuple[int, ...]):
        self.shape, self.stride, self.dtype, self.numel = t.shape, t.stride(), t.dtype, t.numel()
        # t.permute(order) is contiguous: its flat index is the element's offset in memory.
        with torch.profiler.record_function("sj_temporal_fusion::spike_bits_pack"):
            self.bits = pack_bits(t.permute(order).reshape(-1).ne(0))

    def unpack(self) -> Tensor:
        with torch.profiler.record_function("sj_temporal_fusion::spike_bits_unpack"):
            values = unpack_bits(self.bits, self.numel).to(self.dtype)
        return values.as_strided(self.shape, self.stride)


def _pack(t: Tensor):
    registry = _registry()
    source = None if registry is None else registry.source_of(t)
    if source is None:
        if registry is not None:
            registry.counts["kept"] += 1
        return t
    # Keyed by the tag, not the address: a freed spike tensor's memory is often reused by the
    # next one of the same shape within the same forward pass (tests/test_spike_bits.py).
    key = (id(source), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
    packed = registry.packed.get(key)
    if packed is not None:
        registry.counts["reused"] += 1
        return packed
    order = _memory_order(t)
    if order is None:  # overlapping or gapped views are rare here: keep them as they are
        registry.counts["kept"] += 1
        return t
    packed = PackedSpikes(t, order)
    registry.packed[key] = packed
    registry.counts["packed"] += 1
    registry.counts["saved_bytes"] += t.numel() * t.element_size()
    registry.counts["packed_bytes"] += packed.bits.numel()
    return packed


def _unpack(saved):
    return saved.unpack() if isinstance(saved, PackedSpikes) else saved


@contextmanager
def saving():
    """Within this context (one thread), tensors saved for backward that are tagged spikes are
    kept as bits. Yields the registry, whose ``counts`` say how many tensors were packed."""
    with _session() as registry:
        yield registry


class _session:
    """Enter / exit pair usable from module hooks (a forward pre-hook enters, the forward hook
    exits). Nested sessions share the outer registry, so tags from an outer model are seen."""

    def __init__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
        self.owner = False

    def __enter__(self) -> _Registry:
        if _registry() is None:
            _state.registry = _Registry()
            self.owner = True
        self.hooks.__enter__()
        return _state.registry

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)
        if self.owner:
            _state.last_counts = _state.registry.counts
            _state.registry = None


def last_counts() -> Optional[dict]:
    """The packing counts of the last finished outermost session on this thread (for tests and
    the benchmark): packed, reused, kept, saved_bytes, packed_bytes."""
    return getattr(_state, "last_counts", None)


# ---------------------------------------------------------------- on a network: forward hooks

BACKEND = "temporal_fusion"
_open = threading.local()  # per thread: the sessions opened by root pre-hooks, innermost last


def _sessions() -> list:
    if not hasattr(_open, "stack"):
        _open.stack = []
    return _open.stack


class _EnterSaving:
    """Root forward pre-hook: opens a spike-bits session when gradients are on (nothing is saved
    for backward otherwise)."""

    def __call__(self, module, args):
        session = _session() if torch.is_grad_enabled() else None
        if session is not None:
            session.__enter__()
        _sessions().append(session)


class _LeaveSaving:
    """Root forward hook, registered with always_call=True so that a forward that raises still
    closes its session."""

    def __call__(self, module, args, output):
        stack = _sessions()
        if stack:
            session = stack.pop()
            if session is not None:
                session.__exit__(None, None, None)


class _TagSpikes:
    """Neuron forward hook: its output is a spike tensor when it ran our kernels."""

    def __call__(self, module, args, output):
        if getattr(module, "backend", None) == BACKEND and active():
            tag(output)


class _TagSelection:
    """Max-pool forward hook: max of spikes is a spike."""

    def __call__(self, module, args, output):
        if active() and args:
            tag_selection(args[0], output)


_HOOKS = (_EnterSaving, _LeaveSaving, _TagSpikes, _TagSelection)


def attach(net: torch.nn.Module, neuron_classes: tuple) -> bool:
    """Register the hooks on ``net``, its neurons (instances of ``neuron_classes``) and its
    max-pooling layers; True when some neuron runs backend 'temporal_fusion' now."""
    net.register_forward_pre_hook(_EnterSaving())
    net.register_forward_hook(_LeaveSaving(), always_call=True)
    found = False
    for module in net.modules():
        if isinstance(module, neuron_classes):
            module.register_forward_hook(_TagSpikes())
            found = found or getattr(module, "backend", None) == BACKEND
        elif isinstance(module, (torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.MaxPool3d)) \
                and not module.return_indices:
            module.register_forward_hook(_TagSelection())
    return found


def detach(net: torch.nn.Module) -> None:
    """Remove the hooks from every module of ``net``; found by type, not by stored handles, so
    that it works on deep copies and unpickled models."""
    for module in net.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook_id in [k for k, hook in hooks.items() if isinstance(hook, _HOOKS)]:
                del hooks[hook_id]
                module._forward_hooks_always_called.pop(hook_id, None)
                module._forward_hooks_with_kwargs.pop(hook_id, None)


def attached(net: torch.nn.Module) -> bool:
    return any(isinstance(h, _EnterSaving) for h in net._forward_pre_hooks.values())
