"""QIFNode (csrc/neurons/qif.cuh): h = v + (x + a0 (v - v_rest)(v - v_c)) / tau."""
from spikingjelly.activation_based import neuron

from .base import (NeuronModel, base_reset, common_options, common_validate, positive, reset_form_bits, scalar, v_reset_value)


def node_options(node) -> dict:
    return dict(common_options(node), tau=node.tau, v_c=node.v_c, a0=node.a0, v_rest=node.v_rest)


def validate(o) -> None:
    common_validate(o)
    positive("tau", o["tau"])
    positive("a0", o["a0"])


def param_values(o) -> list:
    v_reset = v_reset_value(o)
    return [float(o["tau"]), float(o["v_c"]), float(o["a0"]), scalar("v_threshold", o["v_threshold"]),
            v_reset, float(o["v_rest"])]


def charge(z, x, o):
    (v,) = z
    return v + (x + o["a0"] * (v - o["v_rest"]) * (v - o["v_c"])) / o["tau"]


MODEL = NeuronModel(
    name="qif", struct="QifModel", classes=(neuron.QIFNode,), states=("v",),
    params=("tau", "v_c", "a0", "v_threshold", "v_reset", "v_rest"),
    defaults=dict(tau=2.0, v_c=0.8, a0=1.0, v_threshold=1.0, v_rest=0.0, v_reset=-0.1, detach_reset=False),
    node_options=node_options, validate=validate, form=reset_form_bits, forms=(0, 1, 2, 3), detach_bit=2,
    param_values=param_values,
    initial_state=lambda o: (0.0 if o["v_reset"] is None else float(o["v_reset"]),),
    charge=charge, reset=lambda z, h, s, sd, o: base_reset(z[0], h, s, sd, o))
