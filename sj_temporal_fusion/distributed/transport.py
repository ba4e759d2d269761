"""What the time-sharded node asks of a point-to-point transport between the ranks of a time group.

Two engines implement it (``registry.transport_for`` picks one per group and device):
  * ``torch_transport.TorchTransport``: ``torch.distributed`` isend/irecv on the group's own
    backend: gloo for CPU tensors, NCCL for CUDA tensors when the group has an NCCL backend (the
    default; docs/time_sharding.md says why);
  * ``nccl_transport.NcclTransport``: CUDA tensors through CuPy's NCCL communicator
    (``SJ_TF_SHARD_TRANSPORT=cupy``, or a group without NCCL), its waits bounded by a watchdog.

NCCL pairs a rank's sends and receives with its peer's in issue order and ignores tags, so the
node's protocol (node.py) never lets whether a message is sent depend on a value only one rank
knows. Only N-element states move (never a whole sequence). Every failure is a
``TimeShardingError`` naming this rank, the peer, the layer and what was being exchanged.
"""
from __future__ import annotations

from torch import Tensor

from .collectives import all_gather, all_reduce_
from .errors import TimeShardingError


class Transport:
    """Ranks are ranks of the time group (0 .. size-1, in time order). ``send``/``recv`` return a
    handle for ``wait``; after ``wait`` a received tensor may be used by later device work (on
    NCCL that is stream order, the host does not wait). ``exchange(sends, recvs, tag, timeout,
    complete=False)`` posts sends and receives, (tensor, peer, what) each, and waits for the
    receives; ``complete=True`` also waits for the sends and lets the host read the received
    tensors. ``forward_done`` ends a forward, ``flush`` waits for every send in flight,
    ``retire`` drops the completed ones."""

    rank: int
    size: int

    def fail(self, peer: int, what: str, cause: str, is_send: bool, waited: float,
             timeout: float) -> TimeShardingError:
        direction = "sending to" if is_send else "waiting for"
        return TimeShardingError(
            f"time-sharded rank {self.rank} of {self.size}: {direction} rank {peer}: {what} failed "
            f"after {waited:.1f} s (timeout {timeout:g} s): {cause}. Rank {peer} died, stalled, "
            f"or ran other layers or shapes than this rank; see its log. The timeout is "
            f"TimeShardedNode(timeout=...) or SJ_TF_SHARD_TIMEOUT.")

    def all_gather(self, tensor: Tensor, what: str, timeout: float) -> Tensor:
        return all_gather(tensor, self.group, what, timeout)

    def all_reduce_(self, tensor: Tensor, what: str, timeout: float) -> Tensor:
        return all_reduce_(tensor, self.group, what, timeout)

    def close(self) -> None:
        """Stop background work (NCCL's watchdog); the transport is unusable afterwards."""
