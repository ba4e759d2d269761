"""``TimeShardedNode``: one SpikingJelly neuron layer whose time axis is split over the ranks of a
process group, exact and parallel.

Forward, on rank j of k (slices contiguous, in rank order):
  1. run the slice at once from a guessed state (v_reset; 0 for soft reset), keeping checkpoints
     of the state (fp32, fp64 for fp64) every ``chunk`` steps of the model (``REGISTRY[model].chunk``:
     16 for IF/LIF/PLIF, QIF and EIF, 8 for KLIF);
  2. receive the true initial state from rank j-1 (in the state dtype, never rounded to fp16);
  3. fix up: re-run from the true state beside the speculative run (recomputed from its
     checkpoints) until the two pre-spike potentials h are bitwise equal; equal h gives an equal
     spike and an equal v, so from that step on the trajectories coincide. Spikes, v_seq and the
     checkpoints before it are rewritten;
  4. send the final state to rank j+1.
Rank 0 runs its slice from the true state. The critical path is one slice plus k-1 fix-ups and
hops, not k slices. The result equals one device's bit for bit, however long a fix-up runs.

Backward (scan.py): grad_v_init of a slice is affine in the carry from the next rank, so every
rank but 0 first runs a backward without grad_x that also returns A = prod a_t, the ranks combine
(A, B) pairs by an exclusive scan, and each rank then runs its final backward from the true carry.
"""
from __future__ import annotations

import inspect
import itertools
import warnings
import zlib
from typing import Optional

import torch
import torch.distributed as dist
from spikingjelly.activation_based import neuron
from torch import Tensor, nn

from .. import ops
from ..frontends.activation_based import NODES, fusable, node_options
from . import kernels
from .kernels import NeuronSpec
from .scan import exclusive_affine_scan
from .errors import DEFAULT_TIMEOUT, TimeShardingError
from .registry import transport_for
from .transport import Transport

_LAYER_IDS = itertools.count()
TAG_STRIDE = 64   # tags of one layer: layer_id * 64 + phase
TAG_HEADER, TAG_STATE, TAG_CONTINUE = 0, 1, 2
_MAGIC = 0x5354_4654  # "STFT"
_HEADER_DIMS = 8
# Header: magic, layer id, group size, slice length, per-step ndim, dtype, crc32 of the per-step
# shape, this rank's verdict on its own slice, the slice length T= asks for (-1: no T=), whether
# the node continues the previous call's state, then up to 8 per-step dims (-1 padded).
_H_MAGIC, _H_LAYER, _H_SIZE, _H_STEPS, _H_NDIM, _H_DTYPE, _H_CRC, _H_STATUS, _H_WANT, _H_CONT = range(10)
_H_DIMS = 10
_OK, _EMPTY, _WRONG_T = 0, 1, 2
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def time_slice(T: int, rank: int, size: int) -> slice:
    """Rank ``rank``'s contiguous share of T steps over ``size`` ranks: the first T % size ranks
    get one step more. Raises if a rank would get no step."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a group of {size}")
    if T < size:
        raise ValueError(
            f"a sequence of T={T} time steps cannot be split over {size} ranks (each needs at least "
            f"one step): use at most {T} ranks for this layer")
    base, extra = divmod(T, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def shard_input(x_seq: Tensor, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """This rank's slice ``time_slice(T, rank, size)`` of a whole (T, *) sequence."""
    return x_seq[time_slice(x_seq.shape[0], dist.get_rank(group), dist.get_world_size(group))]


class _ShardedNeuron(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v0, params, layer, spec: NeuronSpec, transport: Transport, store_v_seq: bool,
                needs_grad: bool, param_mask: int):
        T, N = x.shape
        j, k = transport.rank, transport.size
        acc = ops.state_dtype(x.dtype)
        tag = layer.layer_id * TAG_STRIDE + TAG_STATE
        if j == 0:
            spike, v_last, v_seq, checkpoints = kernels.shard_forward(
                x, v0.to(acc).contiguous(), spec, params, store_v_seq, needs_grad)
            fixup_len = None
        else:
            # Any guess is exact; v_reset is where a leaky neuron's state tends to be.
            guess = x.new_full((N,), spec.v_reset, dtype=acc)
            spike, v_last, v_seq, checkpoints = kernels.shard_forward(
                x, guess, spec, params, store_v_seq, True)
            v_in = x.new_empty((N,), dtype=acc)
            transport.wait(transport.recv(v_in, j - 1, tag, layer.describe(
                f"forward: the membrane state entering this rank's slice, from rank {j - 1}"),
                layer.timeout))
            fixup_len = kernels.shard_fixup(x, v_in, checkpoints, spike, v_seq, v_last, spec, params)
        if j < k - 1:
            transport.send(v_last, j + 1, tag, layer.describe(
                f"forward: the membrane state leaving this rank's slice, to rank {j + 1}"), layer.timeout)
        # gloo: wait until the neighbour has it, or a rank that exits after a forward-only call
        # could drop it; NCCL: retire what completed (flush in the backward and at exit).
        transport.forward_done()
        layer.last_fixup_len = fixup_len
        ctx.layer, ctx.spec, ctx.transport, ctx.param_mask = layer, spec, transport, param_mask
        if needs_grad:
            ctx.save_for_backward(x, checkpoints, params)
        if v_seq is None:
            v_seq = x.new_empty((0, N))
        if not store_v_seq:
            ctx.mark_non_differentiable(v_seq)
        return spike, v_last, v_seq  # the state stays in the state dtype, as on one device

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_spike, grad_v_last, grad_v_seq):
        x, checkpoints, params = ctx.saved_tensors
        if checkpoints is None:
            raise RuntimeError("TimeShardedNode ran its forward without grad, so it cannot be differentiated")
        layer, spec, transport = ctx.layer, ctx.spec, ctx.transport
        j, k = transport.rank, transport.size
        T, N = x.shape
        acc = ops.state_dtype(x.dtype)
        transport.flush()  # the forward's sends: a peer that died since then is named here
        g_last = None if grad_v_last is None else grad_v_last.contiguous()
        g_seq = None if grad_v_seq is None or grad_v_seq.numel() == 0 else grad_v_seq.contiguous()
        own = None
        if j >= 1:
            # Local pass with no carry from the right: B, and A = prod a_t (not needed on rank k-1).
            _, b, a, _ = kernels.shard_backward(grad_spike, g_seq, g_last, None, x, checkpoints, spec,
                                                params, False, j < k - 1, False)
            own = torch.stack([a if a is not None else torch.zeros_like(b), b])
        carry = exclusive_affine_scan(own, transport, layer.layer_id * TAG_STRIDE,
                                      layer.describe("backward"), layer.timeout,
                                      like=x.new_empty((N,), dtype=acc))
        needs = ops.needs_grad(ctx, _SHARDED_INPUTS)
        mask = ctx.param_mask if needs["params"] else 0
        grad_x, grad_v0, _, grad_params = kernels.shard_backward(
            grad_spike, g_seq, g_last, carry, x, checkpoints, spec, params, True, False, mask)
        transport.flush()  # the scan's sends, so a rank whose neighbour died fails too
        return ops.gradients(_SHARDED_INPUTS, x=grad_x, v0=grad_v0 if needs["v0"] else None,
                             params=grad_params)


# forward's inputs after ctx, by name: they index needs_input_grad and the backward's gradients.
_SHARDED_INPUTS = tuple(inspect.signature(_ShardedNeuron.forward).parameters)[1:]


class TimeShardedNode(nn.Module):
    """Wraps a SpikingJelly neuron with one state variable (IF, LIF, ParametricLIF, QIF, EIF or
    KLIF node; step_mode 'm', stock dynamics; Izhikevich's two are refused by name) so that each
    rank of ``group`` runs a contiguous slice of the time axis, ranks in time order.

    ``forward(x_local)``: x_local (T_j, *) -> spikes (T_j, *), equal bit for bit to the matching
    slice of the one-device run; so are ``v`` (the state after this rank's slice) and ``v_seq``.
    Gradients of x_local equal the one-device ones to rounding; a learned parameter's gradient (PLIF's
    ``w``, KLIF's ``k``, a learned threshold) holds this rank's part, summed over the group by ``sync_gradients``.

    Every rank must call the same TimeShardedNodes in the same order (layers are matched by
    construction order) and call ``backward`` through each of them. ``T``: the whole sequence
    length, to check each rank's share against ``time_slice``. ``timeout`` (s): how long a rank
    waits for a neighbour before raising ``TimeShardingError``. ``name`` appears in errors.

    State: ``functional.reset_net`` resets the wrapped node (this wrapper holds no state of its
    own). A node that is not reset between calls continues in time: rank 0 starts from the last
    rank's final state (received detached; gradients do not flow across calls).
    """

    def __init__(self, node: nn.Module, group: Optional[dist.ProcessGroup] = None, *,
                 T: Optional[int] = None, name: Optional[str] = None, timeout: Optional[float] = None):
        super().__init__()
        if not isinstance(node, NODES):
            raise TypeError(f"TimeShardedNode wraps one of the neurons the backend serves "
                            f"({', '.join(c.__name__ for c in NODES)}), got {type(node).__name__}")
        if not fusable(node):
            raise TypeError(f"{type(node).__name__} overrides the neuron dynamics; time sharding runs "
                            f"the stock dynamics only")
        NeuronSpec.from_options(**node_options(node))  # a model it cannot split is refused by name
        self.node = node
        self.group = group
        self.T = T
        self.layer_id = next(_LAYER_IDS)
        self.name = name or f"{type(node).__name__}#{self.layer_id}"
        self.timeout = float(timeout) if timeout is not None else DEFAULT_TIMEOUT
        self.last_fixup_len: Optional[Tensor] = None
        self._validated_shape = None
        if isinstance(node, neuron.IFNode) and node.v_reset is None:
            warnings.warn(
                f"{self.name}: IFNode with soft reset never forgets its initial state, so the "
                f"fix-up re-runs every slice to its end and time sharding runs the ranks one after "
                f"another: expect no speedup (results stay exact; fixup_stats() reports it)",
                stacklevel=2)

    # the wrapped node's state, as SpikingJelly code expects to find it
    @property
    def v(self):
        return self.node.v

    @property
    def v_seq(self):
        return getattr(self.node, "v_seq", None)

    def describe(self, what: str) -> str:
        return f"layer '{self.name}' {what}"

    def extra_repr(self) -> str:
        return f"name={self.name!r}, timeout={self.timeout:g}"

    def fixup_stats(self) -> Optional[dict]:
        """This rank's fix-up lengths in the last forward (None on rank 0, which has none): steps
        re-run per neuron before its h matched; ``unmatched`` counts neurons that never matched."""
        L = self.last_fixup_len
        if L is None:
            return None
        T = self._validated_shape[0] if self._validated_shape else None
        Lf = L.double()
        levels = torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64, device=L.device)
        q = torch.quantile(Lf[: 1 << 24], levels)  # quantile's input limit; a prefix suffices
        return dict(T_local=T, N=L.numel(), mean=Lf.mean().item(), p50=q[0].item(), p90=q[1].item(),
                    p99=q[2].item(), max=int(L.max().item()),
                    unmatched=int((L == T).sum().item()) if T is not None else None)

    def _exchange_headers(self, transport: Transport, x: Tensor, status: int, want: int,
                          continuing: bool) -> None:
        """Neighbours swap headers (layer, group size, slice length, per-step shape, dtype, each
        rank's verdict on its own slice, whether it continues the previous call's state) on every
        call, whatever the transport: NCCL pairs messages in issue order and ignores tags, so
        whether a message is sent must not depend on a value one rank alone knows. The exchange
        completes on both sides (sends included) before anything is checked, so both ranks of a
        pair learn a mismatch, and raise, before either can tear the connection down."""
        j, k = transport.rank, transport.size
        shape = tuple(x.shape[1:])
        dims = list(shape[:_HEADER_DIMS]) + [-1] * (_HEADER_DIMS - min(len(shape), _HEADER_DIMS))
        mine = [0] * _H_DIMS + dims
        mine[_H_MAGIC], mine[_H_LAYER], mine[_H_SIZE], mine[_H_STEPS] = _MAGIC, self.layer_id, k, x.shape[0]
        mine[_H_NDIM], mine[_H_DTYPE] = len(shape), _DTYPE_CODES[x.dtype]
        mine[_H_CRC] = zlib.crc32(repr(shape).encode())
        mine[_H_STATUS], mine[_H_WANT], mine[_H_CONT] = status, want, int(continuing)
        peers = [p for p in (j - 1, j + 1) if 0 <= p < k]
        received = {}
        if peers:
            header = torch.tensor(mine, dtype=torch.int64, device=x.device)
            bufs = {p: torch.empty_like(header) for p in peers}
            transport.exchange(
                [(header, p, self.describe(f"forward: shape header to rank {p}")) for p in peers],
                [(bufs[p], p, self.describe(f"forward: shape header from rank {p}")) for p in peers],
                self.layer_id * TAG_STRIDE + TAG_HEADER, self.timeout, complete=True)
            received = {p: b.cpu().tolist() for p, b in bufs.items()}
        self._check_own_slice(j, k, x.shape[0], status, want)
        names = {v: kk for kk, v in _DTYPE_CODES.items()}
        where = f"time-sharded rank {j}: {self.describe('forward')}"
        for p, h in received.items():
            if h[_H_MAGIC] != _MAGIC or h[_H_LAYER] != self.layer_id:
                raise TimeShardingError(
                    f"{where} (layer id {self.layer_id}) met rank {p} in layer id {h[_H_LAYER]}: every "
                    f"rank must construct and call the same TimeShardedNodes in the same order")
            if h[_H_SIZE] != k:
                raise TimeShardingError(f"{where}: rank {p} sees a group of {h[_H_SIZE]} ranks, this rank {k}")
            their_shape = tuple(h[_H_DIMS:_H_DIMS + min(h[_H_NDIM], _HEADER_DIMS)])
            if h[_H_CRC] != mine[_H_CRC] or h[_H_NDIM] != len(shape):
                raise TimeShardingError(
                    f"{where}: this rank's slice has per-step shape {shape} but rank {p}'s has "
                    f"{their_shape}: every rank passes a (T_j, *) slice of the same sequence, so * must agree")
            if h[_H_DTYPE] != mine[_H_DTYPE]:
                raise TimeShardingError(
                    f"{where}: this rank's slice is {x.dtype} but rank {p}'s is {names.get(h[_H_DTYPE])}")
            if h[_H_STATUS] == _EMPTY:
                raise TimeShardingError(
                    f"{where}: rank {p} has an empty slice; a group of {k} ranks needs at least {k} time steps")
            if h[_H_STATUS] == _WRONG_T:
                theirs = time_slice(self.T, p, k) if self.T is not None and self.T >= k else None
                raise TimeShardingError(
                    f"{where}: rank {p} got {h[_H_STEPS]} steps but T={self.T} over {k} ranks gives it "
                    f"{h[_H_WANT]}" + (f" (time_slice({self.T}, {p}, {k}) = steps {theirs.start}.."
                                       f"{theirs.stop - 1})" if theirs is not None else ""))
            if h[_H_CONT] != int(continuing):
                state = {True: "continues the previous call's state", False: "starts from a reset state"}
                raise TimeShardingError(
                    f"{where}: rank {p} {state[bool(h[_H_CONT])]} but this rank "
                    f"{state[continuing]}: call spikingjelly.activation_based.functional.reset_net on "
                    f"every rank or on none")

    def _check_own_slice(self, j: int, k: int, steps: int, status: int, want: int) -> None:
        if status == _EMPTY:
            raise ValueError(f"time-sharded rank {j}: {self.describe('forward')}: this rank's slice is "
                             f"empty; a group of {k} ranks needs at least {k} time steps")
        if status == _WRONG_T:
            s = time_slice(self.T, j, k)  # raises, saying so, when T < k
            raise ValueError(
                f"time-sharded rank {j}: {self.describe('forward')} got {steps} steps, but "
                f"T={self.T} over {k} ranks gives this rank {want} "
                f"(time_slice({self.T}, {j}, {k}) = steps {s.start}..{s.stop - 1})")

    def forward(self, x_local: Tensor) -> Tensor:
        node = self.node
        if node.step_mode != "m":
            raise ValueError(f"{self.name}: time sharding needs step_mode='m' (a (T_j, *) slice), got "
                             f"'{node.step_mode}'")
        if not isinstance(x_local, Tensor) or x_local.dim() < 1:
            raise ValueError(f"{self.name}: x_local must be a (T_j, *) tensor")
        if x_local.dtype not in ops.SUPPORTED_DTYPES:
            raise TypeError(f"{self.name}: time sharding takes float16/bfloat16/float32/float64, got "
                            f"{x_local.dtype}")
        transport = transport_for(x_local.device, self.group, self.timeout)
        j, k = transport.rank, transport.size
        shape = tuple(x_local.shape[1:])
        # This rank's verdict on its own slice travels in the header, so its neighbours raise too.
        status, want = _OK, -1
        if self.T is not None:
            mine = time_slice(self.T, j, k) if self.T >= k else slice(0, 0)
            want = mine.stop - mine.start
        if x_local.shape[0] == 0:
            status = _EMPTY
        elif self.T is not None and x_local.shape[0] != want:
            status = _WRONG_T
        self._exchange_headers(transport, x_local, status, want, isinstance(node.v, Tensor))
        self._validated_shape = tuple(x_local.shape)
        T_j = x_local.shape[0]
        x = x_local.reshape(T_j, -1).contiguous()
        N = x.shape[1]
        options = node_options(node)
        spec = NeuronSpec.from_options(**options)
        params, param_mask = kernels.neuron_parameters(options, x)  # the parameter tensor
        acc = ops.state_dtype(x.dtype)

        v0 = None
        if isinstance(node.v, Tensor):
            if tuple(node.v.shape) != shape:
                raise ValueError(
                    f"{self.name}: the membrane state has shape {tuple(node.v.shape)} but each input "
                    f"step has shape {shape}: call spikingjelly.activation_based.functional.reset_net "
                    f"on every rank before changing the input shape")
            # Continuing in time: rank 0 starts where the last rank ended.
            if k == 1:
                v0 = node.v.to(acc).reshape(-1)
            elif j == k - 1:
                transport.send(node.v.detach().to(acc).reshape(-1).contiguous(), 0,
                               self.layer_id * TAG_STRIDE + TAG_CONTINUE,
                               self.describe("forward: the final state of the previous call, to rank 0"),
                               self.timeout)
            elif j == 0:
                buf = x.new_empty((N,), dtype=acc)
                v0 = transport.wait(transport.recv(
                    buf, k - 1, self.layer_id * TAG_STRIDE + TAG_CONTINUE,
                    self.describe(f"forward: the final state of the previous call from rank {k - 1} "
                                  f"(is the node reset on some ranks only?)"), self.timeout))
        elif j == 0:
            v0 = x.new_full((N,), float(node.v), dtype=acc)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (v0 is not None and v0.requires_grad)
            or param_mask != 0)
        spike, v_last, v_seq = _ShardedNeuron.apply(x, v0, params, self, spec, transport,
                                                 bool(node.store_v_seq), needs_grad, param_mask)
        node.v = v_last.reshape(shape)
        if node.store_v_seq:
            node.v_seq = v_seq.reshape(x_local.shape)
        return spike.reshape(x_local.shape)
