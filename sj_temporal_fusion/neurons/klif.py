"""KLIFNode (csrc/neurons/klif.cuh): LIF's charge scaled by the learnable k and rectified.

SpikingJelly 0.0.0.0.14's torch code raises for v_reset=None (its charge subtracts v_reset); we
follow the documented dynamics with v_reset = 0 in the charge."""
from spikingjelly.activation_based import neuron

from .base import NeuronModel, base_reset, common_options, common_validate, positive, scalar, v_reset_value

DECAY_INPUT, HARD, DETACH, SCALE = 1, 2, 4, 8


def node_options(node) -> dict:
    return dict(common_options(node), tau=node.tau, decay_input=node.decay_input, k=node.k,
                scale_reset=node.scale_reset)


def validate(o) -> None:
    common_validate(o)
    positive("tau", o["tau"])
    scalar("k", o["k"])


def form(o) -> int:
    return ((DECAY_INPUT if o["decay_input"] else 0) | (HARD if o["v_reset"] is not None else 0)
            | (DETACH if o["detach_reset"] else 0) | (SCALE if o["scale_reset"] else 0))


def param_values(o) -> list:
    v_reset = v_reset_value(o)
    return [float(o["tau"]), scalar("k", o["k"]), scalar("v_threshold", o["v_threshold"]), v_reset]


def charge(z, x, o):
    (v,) = z
    vr = 0.0 if o["v_reset"] is None else o["v_reset"]
    h = v + (x - (v - vr)) / o["tau"] if o["decay_input"] else v - (v - vr) / o["tau"] + x
    return (o["k"] * h).relu()


def reset(z, h, s, sd, o):
    if not o["scale_reset"]:
        return base_reset(z[0], h, s, sd, o)
    if o["v_reset"] is None:
        return ((h - sd * o["v_threshold"]) / o["k"],)
    return ((1.0 - sd) * (h / o["k"]) + sd * o["v_reset"],)


MODEL = NeuronModel(
    name="klif", struct="KlifModel", classes=(neuron.KLIFNode,), states=("v",),
    params=("tau", "k", "v_threshold", "v_reset"),
    defaults=dict(tau=2.0, decay_input=True, k=1.0, scale_reset=False, v_threshold=1.0, v_reset=0.0,
                  detach_reset=False),
    node_options=node_options, validate=validate, form=form, forms=tuple(range(16)), detach_bit=DETACH,
    param_values=param_values,
    initial_state=lambda o: (0.0 if o["v_reset"] is None else float(o["v_reset"]),),
    charge=charge, reset=reset, chunk=8, learned=dict(k=1.0))
