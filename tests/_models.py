"""Per-model test descriptions, one entry per model of ``neurons.REGISTRY`` (a test fails when a
registered model has none): the options that change its formulas (the covering grid's factors),
fixed option values that make every term matter, how SpikingJelly builds the node, and its
learnable tensors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from spikingjelly.activation_based import neuron

from _grid import RESETS


@dataclass
class ModelCase:
    grid: dict                       # factors of the covering grid (the model's options)
    fixed: dict                      # options held fixed, chosen so every term of the formula matters
    make_node: Callable              # (options, **node kwargs) -> SpikingJelly node
    learnable: Callable = lambda o: {}  # options -> {name: fresh tensor requiring grad} for functional calls
    sj_fails: Callable = lambda o: False  # options SpikingJelly's own torch code cannot run
    exact: bool = True               # fp32/fp64 forward bitwise equal to the torch backend
    x_scale: float = 0.9
    x_shift: float = 0.35


def _lif_node(o, **kw):
    common = dict(v_threshold=o["v_threshold"], v_reset=o["v_reset"], detach_reset=o["detach_reset"], **kw)
    if o["kind"] == "if":
        return neuron.IFNode(**common)
    if o["kind"] == "lif":
        return neuron.LIFNode(tau=o["tau"], decay_input=o["decay_input"], **common)
    node = neuron.ParametricLIFNode(init_tau=2.5, decay_input=o["decay_input"], **common)
    return node


def _klif_node(o, **kw):
    node = neuron.KLIFNode(scale_reset=o["scale_reset"], tau=o["tau"], decay_input=o["decay_input"],
                           v_threshold=o["v_threshold"], v_reset=o["v_reset"], detach_reset=o["detach_reset"], **kw)
    with torch.no_grad():
        node.k.fill_(1.3)  # k = 1 would hide every place k enters
    return node


MODELS = {
    "lif": ModelCase(
        grid=dict(kind=["if", "lif", "plif"], v_reset=RESETS, decay_input=[True, False], detach_reset=[False, True]),
        fixed=dict(tau=1.6, v_threshold=0.45), make_node=_lif_node,
        learnable=lambda o: dict(w=torch.tensor(-0.4, requires_grad=True)) if o["kind"] == "plif" else {}),
    "qif": ModelCase(
        grid=dict(v_reset=[-0.1, None], detach_reset=[False, True]),
        fixed=dict(tau=1.7, v_c=0.6, a0=0.3, v_threshold=0.6, v_rest=-0.05),
        make_node=lambda o, **kw: neuron.QIFNode(tau=o["tau"], v_c=o["v_c"], a0=o["a0"], v_threshold=o["v_threshold"],
                                                 v_rest=o["v_rest"], v_reset=o["v_reset"],
                                                 detach_reset=o["detach_reset"], **kw),
        x_scale=0.5, x_shift=0.2),
    "eif": ModelCase(
        grid=dict(v_reset=[-0.1, None], detach_reset=[False, True]),
        fixed=dict(tau=1.8, delta_T=0.7, theta_rh=0.5, v_threshold=0.8, v_rest=-0.05),
        make_node=lambda o, **kw: neuron.EIFNode(tau=o["tau"], delta_T=o["delta_T"], theta_rh=o["theta_rh"],
                                                 v_threshold=o["v_threshold"], v_rest=o["v_rest"],
                                                 v_reset=o["v_reset"], detach_reset=o["detach_reset"], **kw),
        exact=False, x_scale=0.4, x_shift=0.1),
    "izhikevich": ModelCase(
        grid=dict(v_reset=[0.0, -0.2, None], detach_reset=[False, True]),
        fixed=dict(tau=1.7, v_c=0.6, a0=0.3, v_threshold=0.6, v_rest=-0.1, w_rest=0.05, tau_w=3.0, a=0.3, b=0.15),
        make_node=lambda o, **kw: neuron.IzhikevichNode(
            tau=o["tau"], v_c=o["v_c"], a0=o["a0"], v_threshold=o["v_threshold"], v_reset=o["v_reset"],
            v_rest=o["v_rest"], w_rest=o["w_rest"], tau_w=o["tau_w"], a=o["a"], b=o["b"],
            detach_reset=o["detach_reset"], **kw),
        x_scale=0.5, x_shift=0.25),
    "klif": ModelCase(
        grid=dict(v_reset=RESETS, decay_input=[True, False], detach_reset=[False, True], scale_reset=[False, True]),
        fixed=dict(tau=1.6, v_threshold=0.45), make_node=_klif_node,
        learnable=lambda o: dict(k=torch.tensor(1.3, requires_grad=True)),
        sj_fails=lambda o: o["v_reset"] is None),  # SpikingJelly's charge computes v - None
}
