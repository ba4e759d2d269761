"""The backward's carry across ranks as an exclusive scan of affine maps.

Rank j's slice maps the carry entering its last step, c, to the carry leaving its first step:
f_j(c) = A_j * c + B_j (elementwise over the N neurons; A_j = prod_t dh/dv * dv/dh, B_j = the
slice's own contribution). Rank j needs c_j = f_{j+1}(f_{j+2}(... f_{k-1}(0))), the composition
of everything to its right. Composition is associative:
    (A1, B1) o (A2, B2) = (A1 * A2, A1 * B2 + B1),
so recursive doubling finds every c_j in 1 + ceil(log2(k - 1)) hops of 2N state-dtype values
(a chain would take k - 1 hops): a shift hands f_{j+1} to rank j, then in round d = 1, 2, 4, ...
rank j composes its partial (covering ranks j+1 .. j+d) with rank j+d's (j+d+1 .. j+2d).
Only neighbours' N-element states move; no rank ever holds another's sequence.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .transport import Transport

TAG_SHIFT = 3
TAG_ROUND = 4  # + round index


def scan_rounds(k: int) -> list[int]:
    """The doubling distances after the shift: 1, 2, 4, ... below k - 1."""
    rounds, d = [], 1
    while d < k - 1:
        rounds.append(d)
        d *= 2
    return rounds


def compose(outer: Tensor, inner: Tensor) -> Tensor:
    """(2, N) pairs (A, B): outer o inner."""
    return torch.stack([outer[0] * inner[0], outer[0] * inner[1] + outer[1]])


def exclusive_affine_scan(own: Optional[Tensor], transport: Transport, tag_base: int, what: str,
                          timeout: float, like: Tensor) -> Optional[Tensor]:
    """``own`` (2, N) = (A_j, B_j) of this rank (None on rank 0, whose map nobody needs; rank
    k-1's A is ignored since nothing lies to its right). Returns this rank's incoming carry c_j
    (N,), or None on rank k-1. ``like`` gives the dtype and device of the (2, N) messages."""
    j, k = transport.rank, transport.size
    if k == 1:
        return None
    shape = (2, like.shape[-1])
    partial = None
    # Shift: f_{j+1} to rank j. Rank k-1's map is constant (its carry in is 0): A = 0.
    send = None
    if j >= 1:
        message = own.clone()
        if j == k - 1:
            message[0].zero_()
        send = (message, j - 1, f"{what}: the backward carry map (A, B) of rank {j}")
    recv = None
    if j <= k - 2:
        partial = like.new_empty(shape)
        recv = (partial, j + 1, f"{what}: the backward carry map (A, B) of rank {j + 1}")
    transport.exchange([send] if send else [], [recv] if recv else [], tag_base + TAG_SHIFT, timeout)
    if j == k - 1:
        return None
    for r, d in enumerate(scan_rounds(k)):
        send = (partial, j - d, f"{what}: scan round {r} partial of rank {j}") if j - d >= 0 else None
        other = None
        if j + d <= k - 2:
            other = like.new_empty(shape)
            recv = (other, j + d, f"{what}: scan round {r} partial of rank {j + d}")
        else:
            recv = None
        transport.exchange([send] if send else [], [recv] if recv else [], tag_base + TAG_ROUND + r,
                           timeout)
        if other is not None:
            partial = compose(partial, other)  # a new tensor: the one in flight is not touched
    return partial[1]
