"""EIFNode (csrc/neurons/eif.cuh):
h = v + (x + v_rest - v + delta_T exp((v - theta_rh) / delta_T)) / tau."""
import torch
from spikingjelly.activation_based import neuron
from .. import versions
from .base import (NeuronModel, base_reset, common_options, common_validate, positive, reset_form_bits, scalar, v_reset_value)

cd_neuron = versions.clock_driven("neuron")  # a stand-in matching nothing under SpikingJelly 2.x


def node_options(node) -> dict:
    return dict(common_options(node), tau=node.tau, delta_T=node.delta_T, theta_rh=node.theta_rh,
                v_rest=node.v_rest)


def validate(o) -> None:
    common_validate(o)
    positive("tau", o["tau"])
    positive("delta_T", o["delta_T"])


def param_values(o) -> list:
    v_reset = v_reset_value(o)
    return [float(o["tau"]), float(o["delta_T"]), float(o["theta_rh"]),
            scalar("v_threshold", o["v_threshold"]), v_reset, float(o["v_rest"])]


def charge(z, x, o):
    (v,) = z
    return v + (x + o["v_rest"] - v + o["delta_T"] * torch.exp((v - o["theta_rh"]) / o["delta_T"])) / o["tau"]


MODEL = NeuronModel(
    name="eif", struct="EifModel", classes=(neuron.EIFNode,), states=("v",),
    params=("tau", "delta_T", "theta_rh", "v_threshold", "v_reset", "v_rest"),
    defaults=dict(tau=2.0, delta_T=1.0, theta_rh=0.8, v_threshold=1.0, v_rest=0.0, v_reset=-0.1,
                  detach_reset=False),
    node_options=node_options, validate=validate, form=reset_form_bits, forms=(0, 1, 2, 3), detach_bit=2,
    param_values=param_values,
    initial_state=lambda o: (0.0 if o["v_reset"] is None else float(o["v_reset"]),),
    charge=charge, reset=lambda z, h, s, sd, o: base_reset(z[0], h, s, sd, o),
    clock_driven=(cd_neuron.MultiStepEIFNode,))
