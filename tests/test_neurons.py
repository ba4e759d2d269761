"""The model registry is complete: every registered model has its header, its Python description
consistent with it, and every test this suite runs per model (the parity grids of test_functional
and test_spikingjelly, gradcheck, opcheck, traffic, NVRTC variants). A model added without any of
these fails here."""
import re
from pathlib import Path

import pytest
from spikingjelly.activation_based import base, neuron

import sj_temporal_fusion
from sj_temporal_fusion import _cuda
from sj_temporal_fusion.neurons import REGISTRY

from _models import MODELS
from test_bench_traffic import BYTES_PER_NEURON_STEP

CSRC = Path(sj_temporal_fusion.__file__).parent / "csrc"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_header_matches_the_python_description(name):
    m = REGISTRY[name]
    header = (CSRC / "neurons" / f"{name}.cuh").read_text()
    enum = re.search(rf"struct {m.struct}\b[^{{]*{{[^\n]*\n\s*enum {{([^}}]*)}}", header)
    assert enum, f"csrc/neurons/{name}.cuh defines no struct {m.struct} with its enum"
    values = dict(re.findall(r"(\w+) = (\d+)", enum.group(1)))
    assert int(values["S"]) == m.num_states and int(values["NP"]) == len(m.params)
    assert int(values["CHUNK"]) == m.chunk
    assert int(values["V_TH"]) == m.params.index("v_threshold") and int(values["V_RESET"]) == m.params.index("v_reset")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_model_has_its_tests(name):
    m = REGISTRY[name]
    assert name in MODELS, f"tests/_models.py has no entry for {name!r}: no parity grid runs for it"
    assert set(MODELS[name].grid) | set(MODELS[name].fixed) <= set(m.defaults)
    assert any(model == name for model, _ in BYTES_PER_NEURON_STEP), "its bytes per neuron-step are not stated"
    names = _cuda.all_name_expressions()
    for kernel in ("neuron_forward", "neuron_backward") + (("neuron_fixup",) if m.shardable else ()):
        assert any(n.startswith(f"{kernel}<{m.struct},") for n in names), f"{kernel} of {name} is never compiled"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_classes_and_options(name):
    m = REGISTRY[name]
    for cls in m.classes:
        assert issubclass(cls, base.MemoryModule)
        node = cls(step_mode="m")
        assert "temporal_fusion" in node.supported_backends
        assert set(m.node_options(node)) <= set(m.defaults) | {"kind", "w", "k"}
        assert all(hasattr(node, s) for s in m.states)


def test_every_spikingjelly_neuron_is_served_or_explained():
    """Every neuron class SpikingJelly 0.0.0.0.14 defines in activation_based.neuron is served,
    except LIAFNode, whose __init__ raises AttributeError there (so no LIAFNode can exist)."""
    served = {cls for m in REGISTRY.values() for cls in m.classes}
    defined = {c for c in vars(neuron).values() if isinstance(c, type) and issubclass(c, neuron.BaseNode)
               and c.__module__ == neuron.__name__ and c not in (neuron.BaseNode, neuron.AdaptBaseNode)}
    assert defined - served == {neuron.LIAFNode}, defined - served
    with pytest.raises(AttributeError):
        neuron.LIAFNode(act=lambda x: x, threshold_related=True)
