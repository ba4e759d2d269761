"""The time-sharding kernels of csrc/shard.cu, launched through ``ops._launch`` (GPU build for CUDA
tensors, host build otherwise), plus ``NeuronSpec``: a SpikingJelly node's options as the plain
values the kernels take. Layouts: sequences (T, N), states (N,) in the state dtype
(``ops.state_dtype``: fp32 for fp16/bf16/fp32, fp64 for fp64)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import ops, surrogate as surrogate_specs
from ..functional import KINDS
from ..ops import Kind


@dataclass(frozen=True)
class NeuronSpec:
    """Plain kernel arguments of one neuron layer (``k_tensor`` is built per call: PLIF's w learns)."""
    kind: int
    tau: float
    keep: float
    v_threshold: float
    v_reset: float          # 0.0 for soft reset
    hard_reset: bool
    decay_input: bool
    detach_reset: bool
    surrogate_id: int
    surrogate_a: float
    surrogate_b: float

    @property
    def flags(self) -> int:
        return ops._flags(self.decay_input, self.hard_reset, self.detach_reset)

    @staticmethod
    def from_options(kind: str = "lif", tau: float = 2.0, w: Optional[Tensor] = None,
                     decay_input: bool = True, v_threshold: float = 1.0,
                     v_reset: Optional[float] = 0.0, detach_reset: bool = False,
                     surrogate_function=None) -> "NeuronSpec":
        """From ``lif_multi_step``'s keyword arguments (``spikingjelly.node_options(node)``)."""
        neuron = KINDS[kind]
        sg = surrogate_specs.spec(surrogate_function)
        tau_value = float(tau) if neuron == Kind.LIF else 1.0
        hard = v_reset is not None
        # keep = 1 - 1/tau in double, as functional.lif_multi_step computes it
        return NeuronSpec(int(neuron), tau_value, 1.0 - 1.0 / tau_value, float(v_threshold),
                          float(v_reset) if hard else 0.0, hard, bool(decay_input),
                          bool(detach_reset), sg.id, sg.a, sg.b)

    def acc_args(self) -> list:
        return [("acc", self.tau), ("acc", self.keep), ("acc", self.v_threshold), ("acc", self.v_reset)]


def plif_k_tensor(w: Tensor, dtype: torch.dtype) -> Tensor:
    """PLIF's (sigmoid(w), 1 - sigmoid(w)) in w's dtype, then the state dtype: the same values
    functional.lif_multi_step passes, so a sharded PLIF equals the one-device run bit for bit."""
    k = w.sigmoid().reshape(1)
    return torch.cat([k, 1.0 - k]).to(ops.state_dtype(dtype))


def shard_forward(x: Tensor, v_init: Tensor, spec: NeuronSpec, k_tensor: Optional[Tensor],
                  store_v_seq: bool, save_checkpoints: bool):
    """x (T, N), v_init (N,) state dtype -> spike (T, N), v_last (N,) state dtype, v_seq (T, N) or
    None, checkpoints (ceil(T/16), N) state dtype or None."""
    T, N = x.shape
    spike = torch.empty_like(x)
    v_last = torch.empty_like(v_init)
    v_seq = torch.empty_like(x) if store_v_seq else None
    checkpoints = x.new_empty((ops.num_checkpoints(T), N), dtype=ops.state_dtype(x.dtype)) \
        if save_checkpoints else None
    ops._launch("shard_forward", x, None, [
        ("ptr", x), ("ptr", v_init), ("ptr", spike), ("ptr", v_last), ("ptr", v_seq),
        ("ptr", checkpoints), ("ptr", k_tensor), *spec.acc_args(), ("int", spec.kind),
        ("int", spec.flags), ("int", T), ("ll", N)])
    return spike, v_last, v_seq, checkpoints


def shard_fixup(x: Tensor, v_true: Tensor, checkpoints: Tensor, spike: Tensor, v_seq: Optional[Tensor],
                v_last: Tensor, spec: NeuronSpec, k_tensor: Optional[Tensor]) -> Tensor:
    """Rewrites ``spike``, ``v_seq``, ``checkpoints`` and ``v_last`` (the speculative run's, in
    place) into the run from ``v_true`` (N,). Returns the fix-up length per neuron (N,) int32:
    the first step whose pre-spike h equals the speculative one bitwise, or T if none does."""
    T, N = x.shape
    fixup_len = torch.empty((N,), dtype=torch.int32, device=x.device)
    ops._launch("shard_fixup", x, None, [
        ("ptr", x), ("ptr", v_true), ("ptr", checkpoints), ("ptr", spike), ("ptr", v_seq),
        ("ptr", v_last), ("ptr", fixup_len), ("ptr", k_tensor), *spec.acc_args(),
        ("int", spec.kind), ("int", spec.flags), ("int", T), ("ll", N)])
    return fixup_len


def shard_backward(grad_spike: Tensor, grad_v_seq: Optional[Tensor], grad_v_last: Optional[Tensor],
                   carry_in: Optional[Tensor], x: Tensor, checkpoints: Tensor, spec: NeuronSpec,
                   k_tensor: Optional[Tensor], want_grad_x: bool, want_a: bool, want_grad_k: bool):
    """-> grad_x (T, N) or None, grad_v_init (N,) state dtype, A (N,) state dtype or None, per-neuron
    dL/dk (N,) or None. The carry entering the slice's last step is grad_v_last + carry_in, and
    grad_v_init = A * carry_in + (grad_v_init at carry_in = 0)."""
    T, N = x.shape
    acc = ops.state_dtype(x.dtype)
    grad_x = torch.empty_like(x) if want_grad_x else None
    grad_v_init = x.new_empty((N,), dtype=acc)
    a_prod = x.new_empty((N,), dtype=acc) if want_a else None
    grad_k = x.new_empty((N,), dtype=acc) if want_grad_k else None
    ops._launch("shard_backward", x, spec.surrogate_id, [
        ("ptr", grad_spike), ("ptr", grad_v_seq), ("ptr", grad_v_last), ("ptr", carry_in), ("ptr", x),
        ("ptr", checkpoints), ("ptr", k_tensor), ("ptr", grad_x), ("ptr", grad_v_init), ("ptr", a_prod),
        ("ptr", grad_k), *spec.acc_args(), ("acc", spec.surrogate_a), ("acc", spec.surrogate_b),
        ("int", spec.kind), ("int", spec.flags), ("int", T), ("ll", N)])
    return grad_x, grad_v_init, a_prod, grad_k
