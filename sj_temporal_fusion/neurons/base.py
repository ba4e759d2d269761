"""What a neuron model is to the Python layers: the Python half of csrc/neurons/<name>.cuh.

A model names the SpikingJelly classes it serves, its state variables and parameters (in the
header's order), how a node's options become the kernel's FORM and parameter values, and a
reference step in plain PyTorch for the oracle (``sj_temporal_fusion.reference``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import Tensor

Value = Union[float, Tensor]


@dataclass(frozen=True)
class NeuronModel:
    name: str                   # csrc/neurons/<name>.cuh
    struct: str                 # the C++ struct in that header
    classes: tuple              # activation_based classes it serves (exact classes and subclasses)
    states: tuple               # state variables, node attribute names; states[0] is v
    params: tuple               # parameter names, in the header's order
    defaults: dict              # the functional API's keyword defaults (SpikingJelly's)
    node_options: Callable      # node -> options dict (keys of ``defaults``)
    validate: Callable          # options -> None, raising a clear error for bad options
    form: Callable              # options -> FORM (int) for the backward (forward: detach cleared)
    forms: tuple                # every FORM the model uses (what CI compiles)
    detach_bit: int             # the FORM bit of detach_reset (the forward does not branch on it)
    param_values: Callable      # options -> [float | Tensor] in ``params`` order
    initial_state: Callable     # options -> tuple of floats, one per state variable
    charge: Callable            # reference: (z tuple, x, options) -> h
    reset: Callable             # reference: (z tuple, h, s, s_detached, options) -> new z tuple
    shardable: bool = True      # one state variable: the time-sharded node can split it
    clock_driven: tuple = ()    # spikingjelly.clock_driven.neuron multi-step classes it serves (same
                                # option attribute names; frontends/clock_driven.py)
    chunk: int = 16             # steps between checkpoints (CHUNK in the header)
    learned: dict = field(default_factory=dict)  # options that make a layer learn what its SpikingJelly
                                # class learns as nn.Parameters, at SpikingJelly's initial values: a
                                # float is learnt (a tensor requiring grad), anything else selects
                                # the form that learns it (PLIF: kind='plif', w=0.0)

    @property
    def num_states(self) -> int:
        return len(self.states)

    def forward_form(self, options: dict) -> int:
        return self.form(options) & ~self.detach_bit

    def threshold(self, options: dict) -> Value:
        return options["v_threshold"]


def scalar(name: str, value, allow_none: bool = False) -> Optional[Value]:
    """A node option as a float or a 0-dim / one-element tensor; anything else is a clear error."""
    if value is None and allow_none:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} is a tensor of shape {tuple(value.shape)}; backend 'temporal_fusion' takes one "
                f"value per layer (a float or a one-element tensor / nn.Parameter): use backend='torch' "
                f"for per-channel {name}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float (or a one-element tensor), got {value!r}")
    return float(value)


def v_reset_value(o) -> Value:
    """v_reset as the kernels take it: 0 for soft reset (v_reset=None), where it is unused or, in
    KLIF's charge, the documented 0."""
    return 0.0 if o["v_reset"] is None else scalar("v_reset", o["v_reset"])


def is_zero(value: Value) -> bool:
    # SpikingJelly tests `v_reset == 0.` in Python; a learnable v_reset is read once here.
    return float(value) == 0.0


def base_reset(v, h, s, s_detached, o):
    """SpikingJelly's BaseNode reset (jit_hard_reset / jit_soft_reset)."""
    if o["v_reset"] is None:
        return (h - s_detached * o["v_threshold"],)
    return ((1.0 - s_detached) * h + s_detached * o["v_reset"],)


def reset_form_bits(o) -> int:
    """FORM bits 0 (hard reset) and 1 (detach_reset) of the models with SpikingJelly's BaseNode reset."""
    return (1 if o["v_reset"] is not None else 0) | (2 if o["detach_reset"] else 0)


def common_options(node) -> dict:
    return dict(v_threshold=node.v_threshold, v_reset=node.v_reset, detach_reset=node.detach_reset)


def common_validate(o) -> None:
    scalar("v_threshold", o["v_threshold"])
    scalar("v_reset", o["v_reset"], allow_none=True)


def positive(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{name} must be a positive float, got {value!r}")


def as_tensor(v: Value, like: Tensor) -> Tensor:
    return v if isinstance(v, Tensor) else torch.tensor(v, dtype=like.dtype)
