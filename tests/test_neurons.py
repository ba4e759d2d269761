"""The model registry is complete: every registered model has its header, its Python description
consistent with it, and every test this suite runs per model (the parity grids of test_functional
and test_spikingjelly, gradcheck, opcheck, traffic, NVRTC variants). A model added without any of
these fails here. And adding one takes what docs/adding_a_neuron.md says: a throw-away model,
added that way, is picked up by the builds, the tests and the benchmarks."""
import dataclasses
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from spikingjelly.activation_based import base, neuron

import sj_temporal_fusion
from sj_temporal_fusion import _host, _nvrtc
from sj_temporal_fusion.neurons import REGISTRY

from _models import MODELS

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
    names = _nvrtc.all_name_expressions()
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


@pytest.mark.parametrize("name", list(REGISTRY))
def test_learned_options_are_what_spikingjelly_learns(name):
    """``learned`` names each nn.Parameter of the model's SpikingJelly classes, at its initial
    value, and the options under which the model reads it (PLIF: kind='plif')."""
    m = REGISTRY[name]
    learnt = {}
    for cls in m.classes:
        node = cls(step_mode="m")
        options = m.node_options(node)
        for attribute, p in node.named_parameters():
            learnt[attribute] = p.item()
            assert options[attribute] is p, f"{cls.__name__}.{attribute} is not passed as the tensor itself"
            assert all(options[k] == v for k, v in m.learned.items() if not isinstance(v, float))
    assert learnt == {k: v for k, v in m.learned.items() if isinstance(v, float)}


# ---------------------------------------------------------------- adding a model, tried

NEW = "throwaway"


@pytest.fixture
def new_model(tmp_path, monkeypatch):
    """A model added as docs/adding_a_neuron.md says, in a copy of csrc/: its header (QIF's formulas
    under a new struct), its NeuronModel and its registry entry, and its test description."""
    from sj_temporal_fusion.neurons import qif
    csrc = tmp_path / "csrc"
    shutil.copytree(CSRC, csrc)
    (csrc / "neurons" / f"{NEW}.cuh").write_text(
        (CSRC / "neurons" / "qif.cuh").read_text().replace("QifModel", "ThrowawayModel"))
    model = dataclasses.replace(qif.MODEL, name=NEW, struct="ThrowawayModel", classes=())
    monkeypatch.setitem(REGISTRY, NEW, model)
    monkeypatch.setitem(MODELS, NEW, MODELS["qif"])
    saved, _host.CSRC = _host.CSRC, csrc
    _host.sources_digest.cache_clear()
    try:
        yield model
    finally:
        _host.CSRC = saved
        _host.sources_digest.cache_clear()


def _model_names(value) -> set:
    """The registered model names a parametrize value mentions (strings, in dicts, tuples, params)."""
    if isinstance(value, str):
        return {value} & set(REGISTRY)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):  # pytest.param(...) is a tuple too
        return set().union(*map(_model_names, value))
    return set()


def _enumerations_missing(new: str, registered: set, shardable: set, folder: Path = Path(__file__).parent) -> list[str]:
    """Each parametrization, in every test module of ``folder`` that reads the registry, loaded
    afresh, that covers every registered model (or every shardable one) but leaves out ``new``."""
    missing = []
    for path in sorted(folder.glob("test_*.py")):
        if path.name == Path(__file__).name or "REGISTRY" not in path.read_text():
            continue
        spec = importlib.util.spec_from_file_location(f"_fresh_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except pytest.skip.Exception:  # a module that skips itself here (another SpikingJelly) runs nothing
            continue
        finally:
            sys.modules.pop(spec.name, None)
        for test_name, test in vars(module).items():
            for mark in getattr(test, "pytestmark", []):
                if mark.name != "parametrize":
                    continue
                names = _model_names(list(mark.args[1]))
                if (names >= registered or shardable and names >= shardable) and new not in names:
                    missing.append(f"{path.name}::{test_name} ({mark.args[0]})")
    return missing


@pytest.mark.slow  # a subprocess compiling a new model
def test_a_new_model_is_picked_up(new_model):
    from test_functional import _grid, run_case
    from sj_temporal_fusion.bench import traffic
    from sj_temporal_fusion.variants import forward_variant

    # The variant names of the GPU build (forward, backward, fix-up) and the host build's source.
    names = _nvrtc.all_name_expressions()
    for kernel in ("neuron_forward", "neuron_backward", "neuron_fixup"):
        assert any(n.startswith(f"{kernel}<ThrowawayModel,") for n in names), kernel
    assert f'#include "neurons/{NEW}.cuh"' in _host.variant_source(
        [_host._Variant(forward_variant(new_model, torch.float32, 0), False, False)])
    # Host builds from the new header, equal to the reference built from the NeuronModel: a case
    # in fp64 and one in fp32 of test_functional's grid for it.
    cases = _grid(NEW)
    assert len({c["dtype"] for c in cases}) == 4
    for dtype in (torch.float64, torch.float32):
        run_case(next(c for c in cases if c["dtype"] == dtype))
    # The byte accounting: every variant of it listed, one counted against the design.
    counted = [v for v in traffic.variants() if v["model"] == NEW]
    assert len(counted) == 2 * 10 + 3
    assert counted[0]["pass_"] == "forward-infer"
    measured, design = traffic.measure_variant(counted[0], 19, 67)
    assert measured == design
    # Every test parametrized over the registered models runs for it.
    registered = set(REGISTRY) - {NEW}
    shardable = {n for n in registered if REGISTRY[n].shardable}
    assert _enumerations_missing(NEW, registered, shardable) == []


def test_enumeration_check_can_fail(tmp_path, new_model):
    """A hard-coded model list in a test module is reported; one read from the registry is not."""
    registered = set(REGISTRY) - {NEW}
    (tmp_path / "test_lists.py").write_text(
        "import pytest\nfrom sj_temporal_fusion.neurons import REGISTRY\n"
        f"@pytest.mark.parametrize('model', {sorted(registered)!r})\ndef test_fixed(model):\n    pass\n"
        "@pytest.mark.parametrize('model', list(REGISTRY))\ndef test_registry(model):\n    pass\n")
    assert _enumerations_missing(NEW, registered, set(), tmp_path) == ["test_lists.py::test_fixed (model)"]
