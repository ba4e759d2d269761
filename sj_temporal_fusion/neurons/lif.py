"""IF, LIF and ParametricLIF: one model (csrc/neurons/lif.cuh) with SpikingJelly's charge formulas,
selected by ``kind`` ('if' | 'lif' | 'plif') and the options."""
from spikingjelly.activation_based import neuron
from .. import versions
from .base import NeuronModel, base_reset, common_options, common_validate, is_zero, positive, scalar, v_reset_value

cd_neuron = versions.clock_driven("neuron")  # a stand-in matching nothing under SpikingJelly 2.x

H_IF, H_DIV_DECAY0, H_MUL_DECAY0, H_KEEP = 0, 1, 4, 7  # LIF_H_* in lif.cuh
HARD, DETACH = 8, 16


def node_options(node) -> dict:
    """A node of either API: clock_driven's classes keep activation_based's attribute names."""
    o = common_options(node)
    if isinstance(node, (neuron.LIFNode, cd_neuron.LIFNode)):
        o.update(kind="lif", tau=node.tau, decay_input=node.decay_input)
    elif isinstance(node, (neuron.ParametricLIFNode, cd_neuron.ParametricLIFNode)):
        o.update(kind="plif", w=node.w, decay_input=node.decay_input)
    else:
        o.update(kind="if")
    return o


def validate(o) -> None:
    common_validate(o)
    if o["kind"] not in ("if", "lif", "plif"):
        raise ValueError(f"kind must be 'if', 'lif' or 'plif', got {o['kind']!r}")
    if o["kind"] == "lif":
        positive("tau", o["tau"])
    if o["kind"] == "plif":
        w = o.get("w")
        if w is None or not hasattr(w, "sigmoid") or w.numel() != 1:
            raise ValueError(f"kind='plif' needs w, the learnable one-element tensor with decay "
                             f"sigmoid(w), got {w!r}")


def _reset0(o) -> bool:
    return o["v_reset"] is None or is_zero(o["v_reset"])


def form(o) -> int:
    if o["kind"] == "if":
        charge = H_IF
    elif not o["decay_input"] and _reset0(o):
        charge = H_KEEP
    else:
        base = H_DIV_DECAY0 if o["kind"] == "lif" else H_MUL_DECAY0
        charge = base + (0 if o["decay_input"] and _reset0(o) else 1 if o["decay_input"] else 2)
    return charge | (HARD if o["v_reset"] is not None else 0) | (DETACH if o["detach_reset"] else 0)


def param_values(o) -> list:
    """[tau, k, keep, v_threshold, v_reset] computed as SpikingJelly computes them: LIF's 1 - 1/tau
    in double, PLIF's sigmoid(w) and 1 - sigmoid(w) in w's dtype."""
    tau, k, keep = 1.0, 0.0, 1.0
    if o["kind"] == "lif":
        tau = float(o["tau"])
        keep = 1.0 - 1.0 / tau
    elif o["kind"] == "plif":
        k = o["w"].sigmoid().reshape(())
        keep = 1.0 - k
    v_reset = v_reset_value(o)
    return [tau, k, keep, scalar("v_threshold", o["v_threshold"]), v_reset]


def charge(z, x, o):
    (v,) = z
    if o["kind"] == "if":
        return v + x
    vr = o["v_reset"]
    if o["kind"] == "lif":
        tau = o["tau"]
        if o["decay_input"]:
            return v + (x - v) / tau if _reset0(o) else v + (x - (v - vr)) / tau
        return v * (1.0 - 1.0 / tau) + x if _reset0(o) else v - (v - vr) / tau + x
    k = o["w"].sigmoid()
    if o["decay_input"]:
        return v + (x - v) * k if _reset0(o) else v + (x - (v - vr)) * k
    return v * (1.0 - k) + x if _reset0(o) else v - (v - vr) * k + x


MODEL = NeuronModel(
    name="lif", struct="LifModel", classes=(neuron.IFNode, neuron.LIFNode, neuron.ParametricLIFNode),
    states=("v",), params=("tau", "k", "keep", "v_threshold", "v_reset"),
    defaults=dict(kind="lif", tau=2.0, w=None, decay_input=True, v_threshold=1.0, v_reset=0.0,
                  detach_reset=False),
    node_options=node_options, validate=validate, form=form,
    forms=tuple(c | h | d for c in range(8) for h in (0, HARD) for d in (0, DETACH)), detach_bit=DETACH,
    param_values=param_values,
    initial_state=lambda o: (0.0 if o["v_reset"] is None else float(o["v_reset"]),),
    charge=charge, reset=lambda z, h, s, sd, o: base_reset(z[0], h, s, sd, o),
    clock_driven=(cd_neuron.MultiStepIFNode, cd_neuron.MultiStepLIFNode, cd_neuron.MultiStepParametricLIFNode),
    learned=dict(kind="plif", w=0.0))  # ParametricLIFNode's w = -log(init_tau - 1), init_tau=2
