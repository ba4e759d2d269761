"""``sj_temporal_fusion.set_backend(net, backend)``: one call switches every neuron of a model,
activation_based and clock_driven nodes alike, to 'temporal_fusion' and back to 'torch' / 'cupy',
and reports (and logs) which nodes did not switch and why."""
import logging

import pytest
import torch
from spikingjelly.activation_based import neuron as ab, surrogate as ab_surrogate
from spikingjelly.clock_driven import neuron as cd, surrogate as cd_surrogate

import sj_temporal_fusion


class OwnCharge(cd.MultiStepLIFNode):
    def neuronal_charge(self, x):
        self.v = self.v + x * x


class OwnFire(ab.LIFNode):
    def neuronal_fire(self):
        return (self.v > self.v_threshold).to(self.v)


class CustomSurrogate(ab_surrogate.Sigmoid):
    pass


def mixed_net():
    per_channel = ab.IFNode(step_mode="m")
    per_channel.v_threshold = torch.full((3,), 0.5)
    return torch.nn.Sequential(
        cd.MultiStepLIFNode(tau=2.0), cd.MultiStepIFNode(), cd.MultiStepParametricLIFNode(), cd.MultiStepEIFNode(),
        ab.LIFNode(step_mode="m"), ab.IzhikevichNode(step_mode="s"),
        OwnCharge(), OwnFire(step_mode="m"), per_channel,
        cd.LIFNode(), cd.LIAFNode(torch.relu, True),
        ab.LIFNode(step_mode="m", surrogate_function=CustomSurrogate()),
        cd.MultiStepLIFNode(surrogate_function=cd_surrogate.Sigmoid(spiking=False)),
        torch.nn.Linear(3, 3))


def test_switches_both_apis_and_says_why_not(caplog):
    net = mixed_net()
    with caplog.at_level(logging.INFO, logger="sj_temporal_fusion"):
        result = sj_temporal_fusion.set_backend(net, "temporal_fusion")
    assert result.switched == {"0": "MultiStepLIFNode", "1": "MultiStepIFNode", "2": "MultiStepParametricLIFNode",
                               "3": "MultiStepEIFNode", "4": "LIFNode", "5": "IzhikevichNode"}
    assert all(net[int(i)].backend == "temporal_fusion" for i in result.switched)
    why = result.not_switched
    assert set(why) == {"6", "7", "8", "9", "10", "11", "12"}  # never the Linear: not a neuron
    assert "own neuronal_charge" in why["6"] and "own neuronal_fire" in why["7"]
    assert "v_threshold is a tensor of shape (3,)" in why["8"]
    assert "single-step" in why["9"] and "MultiStepLIFNode" in why["9"]
    assert "LIAFNode outputs act(v)" in why["10"]
    assert "CustomSurrogate" in why["11"] and "spiking=False" in why["12"]
    for i in ("6", "7", "8", "11", "12"):
        assert net[int(i)].backend == "torch" and "stays on 'torch'" in why[i]
    assert "6 switched, 7 not" in caplog.text and "LIAFNode outputs" in caplog.text
    x = torch.rand(4, 2, 3)
    for i in range(4):
        assert net[i](x).shape == x.shape


def test_and_back_to_torch_and_cupy():
    net = mixed_net()
    sj_temporal_fusion.set_backend(net, "temporal_fusion")
    back = sj_temporal_fusion.set_backend(net, "torch")
    assert all(net[int(i)].backend == "torch" for i in back.switched)
    assert set(back.switched) >= {"0", "1", "2", "3", "4", "5", "6", "7", "8", "11", "12"}
    cupy = sj_temporal_fusion.set_backend(net, "cupy")
    # activation_based offers cupy in step mode 'm' only (no GPU is needed to set it)
    assert "5" in cupy.not_switched and "step mode 's'" in cupy.not_switched["5"]
    assert net[4].backend == "cupy"
    if cd.cupy is None:  # clock_driven imports CuPy with its kernel modules, which also need tensorboard
        assert "Error" in cupy.not_switched["0"] and net[0].backend == "torch"
    else:
        assert net[0].backend == "cupy"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="'temporal_fusion', 'torch', 'cupy'"):
        sj_temporal_fusion.set_backend(torch.nn.Sequential(cd.MultiStepLIFNode()), "lava")


def test_activation_based_subclass_with_no_argument_init():
    class Fixed(ab.LIFNode):
        def __init__(self):
            super().__init__(tau=2.0, detach_reset=True, step_mode="m", backend="torch")

    net = torch.nn.Sequential(Fixed(), Fixed())
    assert list(sj_temporal_fusion.set_backend(net, "temporal_fusion").switched) == ["0", "1"]
    assert net(torch.rand(3, 2, 4)).shape == (3, 2, 4)
