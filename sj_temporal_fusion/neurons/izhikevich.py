"""IzhikevichNode (csrc/neurons/izhikevich.cuh): state (v, w), w the adaptation current."""
from spikingjelly.activation_based import neuron

from .base import NeuronModel, common_options, common_validate, positive, reset_form_bits, scalar, v_reset_value


def node_options(node) -> dict:
    return dict(common_options(node), tau=node.tau, v_c=node.v_c, a0=node.a0, v_rest=node.v_rest,
                w_rest=node.w_rest, tau_w=node.tau_w, a=node.a, b=node.b)


def validate(o) -> None:
    common_validate(o)
    positive("tau", o["tau"])
    positive("tau_w", o["tau_w"])
    positive("a0", o["a0"])


def param_values(o) -> list:
    v_reset = v_reset_value(o)
    # 1 / tau_w in double, as SpikingJelly's jit_neuronal_adaptation computes `1. / tau_w`
    return [float(o["tau"]), float(o["v_c"]), float(o["a0"]), scalar("v_threshold", o["v_threshold"]),
            v_reset, float(o["v_rest"]), 1.0 / float(o["tau_w"]), float(o["a"]), float(o["b"])]


def charge(z, x, o):
    v, w = z
    return v + (x + o["a0"] * (v - o["v_rest"]) * (v - o["v_c"]) - w) / o["tau"]


def reset(z, h, s, sd, o):
    """AdaptBaseNode: adaptation from h, then the reset; its hard reset and w's jump use the
    undetached spike."""
    w = z[1] + 1.0 / o["tau_w"] * (o["a"] * (h - o["v_rest"]) - z[1])
    v = h - sd * o["v_threshold"] if o["v_reset"] is None else (1.0 - sd) * h + s * o["v_reset"]
    return v, w + o["b"] * s


MODEL = NeuronModel(
    name="izhikevich", struct="IzhikevichModel", classes=(neuron.IzhikevichNode,), states=("v", "w"),
    params=("tau", "v_c", "a0", "v_threshold", "v_reset", "v_rest", "inv_tau_w", "a", "b"),
    defaults=dict(tau=2.0, v_c=0.8, a0=1.0, v_threshold=1.0, v_reset=0.0, v_rest=-0.1, w_rest=0.0,
                  tau_w=2.0, a=0.0, b=0.0, detach_reset=False),
    node_options=node_options, validate=validate, form=reset_form_bits, forms=(0, 1, 2, 3), detach_bit=2,
    param_values=param_values,
    initial_state=lambda o: (0.0 if o["v_reset"] is None else float(o["v_reset"]), float(o["w_rest"])),
    charge=charge, reset=reset, chunk=8, shardable=False)
