"""GPU build (sj_temporal_fusion/_nvrtc.py), without a GPU: NVRTC compiles kernel variants to
sm_80 and sm_90 machine code through CuPy's NVRTC bindings, under each CuPy we support (CI runs
this file under CuPy 14 and, from an overlay, CuPy 13); the cubin cache; prebuild; an unsupported
CuPy named with the fix."""
import ast
import os
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

from sj_temporal_fusion import _nvrtc
from sj_temporal_fusion.neurons import REGISTRY
from sj_temporal_fusion.surrogate import DEFAULT_ID
from sj_temporal_fusion.variants import backward_variant, forward_variant
from conftest import require_nvrtc

PACKAGE = Path(_nvrtc.__file__).parent


def _variants():
    """A forward and a backward (with parameter gradients: the most registers) of two models, one
    of them with two state variables."""
    names = []
    for model in ("lif", "izhikevich"):
        m = REGISTRY[model]
        names += [forward_variant(m, torch.float32, m.forms[0] & ~m.detach_bit),
                  backward_variant(m, torch.float32, DEFAULT_ID, m.forms[-1], True)]
    return names


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SJ_TF_CACHE", str(tmp_path))
    return tmp_path


def test_runs_under_the_cupy_it_claims():
    """The CuPy this run checks: one of the checked majors, and exactly $SJ_TF_EXPECT_CUPY when CI
    sets it (so a CuPy 13 overlay that did not take effect fails instead of testing CuPy 14)."""
    cupy = pytest.importorskip("cupy")
    require_nvrtc()
    if os.environ.get("SJ_TF_EXPECT_CUPY"):
        assert cupy.__version__ == os.environ["SJ_TF_EXPECT_CUPY"], Path(cupy.__file__).parent
    assert _nvrtc._version_tuple(cupy.__version__)[0] in {int(v.split(".")[0]) for v in _nvrtc.CHECKED_CUPY}
    print(f"CuPy {cupy.__version__} from {Path(cupy.__file__).parent}, NVRTC {_nvrtc.nvrtc_version()}")


@pytest.mark.parametrize("arch", ["80", "90"])
def test_cubins_compile_and_their_names_resolve(arch):
    require_nvrtc()
    names = _variants()
    cubin, mapping, log = _nvrtc.compile_cubin(_nvrtc.source(), _nvrtc.OPTIONS, names, arch, verbose=True)
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000
    assert set(mapping) == set(names) and len(set(mapping.values())) == len(names)
    for name, mangled in mapping.items():
        assert mangled.startswith("_Z") and mangled.encode() in cubin, name  # an entry of this cubin
        assert f"Compiling entry function '{mangled}' for 'sm_{arch}'" in log


def test_options_keep_subnormals_and_name_the_architecture():
    options = _nvrtc.compile_options(_nvrtc.OPTIONS, "90")
    assert options[:len(_nvrtc.OPTIONS)] == _nvrtc.OPTIONS
    assert "-ftz=false" in options and "-ftz=true" not in options and "--fmad=false" in options
    assert "-arch=sm_90" in options and "--ptxas-options=-v" not in options
    assert "--ptxas-options=-v" in _nvrtc.compile_options(_nvrtc.OPTIONS, "90", verbose=True)


def test_ftz_false_reaches_nvrtc():
    """fp32 subnormals are kept: with the build's options the fp32 forward's PTX has no .ftz
    instruction, and the same options with -ftz=true do give some (so the check can fail)."""
    nvrtc = require_nvrtc()
    name = _variants()[0]
    options = [o for o in _nvrtc.compile_options(_nvrtc.OPTIONS, "90") if not o.startswith("-arch")]
    for ftz, expect in (("-ftz=false", False), ("-ftz=true", True)):
        prog = nvrtc.createProgram(_nvrtc.source(), "k.cu", [], [])
        nvrtc.addNameExpression(prog, name)
        nvrtc.compileProgram(prog, [o for o in options if not o.startswith("-ftz")] + [ftz, "-arch=compute_90"])
        assert (".ftz" in nvrtc.getPTX(prog).decode()) == expect, ftz


def test_a_compile_error_carries_nvrtc_log():
    require_nvrtc()
    with pytest.raises(_nvrtc.NVRTCCompileError, match=r"(?s)no_such_kernel.*-arch=sm_90.*errors? detected"):
        _nvrtc.compile_cubin(_nvrtc.source(), _nvrtc.OPTIONS, ["no_such_kernel<float>"], "90")


def test_an_architecture_nvrtc_does_not_emit_is_named():
    nvrtc = require_nvrtc()
    if not hasattr(nvrtc, "getSupportedArchs"):
        pytest.skip("this CuPy has no getSupportedArchs")
    with pytest.raises(RuntimeError, match=r"cannot emit sm_35 .*CUDA 12 from sm_50"):
        _nvrtc.compile_cubin(_nvrtc.source(), _nvrtc.OPTIONS, _variants()[:1], "35")


def test_threads_compile_at_once_and_agree():
    """Nothing in CuPy is patched: four threads compiling two variants for two architectures at
    once get what one thread gets."""
    require_nvrtc()
    name = _variants()[0]
    jobs = [("80", name), ("90", name)] * 2
    results, errors = [None] * len(jobs), []

    def work(i, arch, expression):
        try:
            results[i] = _nvrtc.compile_cubin(_nvrtc.source(), _nvrtc.OPTIONS, [expression], arch)[:2]
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for arch in ("80", "90"):
        alone = _nvrtc.compile_cubin(_nvrtc.source(), _nvrtc.OPTIONS, [name], arch)[:2]
        assert all(r == alone for r, (a, _) in zip(results, jobs) if a == arch)


# ---------------------------------------------------------------- an unsupported CuPy

def _fake_cupy(monkeypatch, version, drop=()):
    import cupy
    from cupy.cuda import nvrtc
    monkeypatch.setattr(cupy, "__version__", version)
    for name in drop:
        monkeypatch.delattr(nvrtc, name)


def test_a_cupy_without_the_bindings_is_named_with_the_fix(monkeypatch):
    pytest.importorskip("cupy")
    _fake_cupy(monkeypatch, "15.0.0", drop=("getCUBIN",))
    with pytest.raises(_nvrtc.UnsupportedCuPy) as info:
        _nvrtc.compile_cubin(_nvrtc.source(), _nvrtc.OPTIONS, _variants()[:1], "90")
    message = str(info.value)
    assert "CuPy 15.0.0" in message and "getCUBIN" in message
    assert all(v in message for v in _nvrtc.CHECKED_CUPY) and "pip install 'cupy-cuda" in message
    assert not isinstance(info.value, AttributeError)


def test_a_cupy_older_than_13_is_refused_with_the_fix(monkeypatch):
    pytest.importorskip("cupy")
    _fake_cupy(monkeypatch, "12.3.0")
    with pytest.raises(_nvrtc.UnsupportedCuPy, match=r"CuPy 12\.3\.0 .*CuPy >= 13 is required.*<15'"):
        _nvrtc.prebuild(_variants()[:1], "90")


def test_missing_cupy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'sj-temporal-fusion\[cuda13\]'"):
        _nvrtc.nvrtc_module()


# ---------------------------------------------------------------- cache and prebuild

def test_cache_key_follows_nvrtc_and_everything_else(monkeypatch):
    pytest.importorskip("cupy")
    name = _variants()[0]
    monkeypatch.setattr(_nvrtc, "nvrtc_version", lambda: (13, 0))
    base = _nvrtc.cache_key(name, "90", _nvrtc.OPTIONS)
    assert base == _nvrtc.cache_key(name, "90", _nvrtc.OPTIONS)
    assert base != _nvrtc.cache_key(name, "80", _nvrtc.OPTIONS)
    assert base != _nvrtc.cache_key(_variants()[1], "90", _nvrtc.OPTIONS)
    assert base != _nvrtc.cache_key(name, "90", _nvrtc.options_for(512, 1))
    monkeypatch.setattr(_nvrtc, "nvrtc_version", lambda: (12, 9))  # cupy-cuda12x, same CuPy version
    assert base != _nvrtc.cache_key(name, "90", _nvrtc.OPTIONS)


def _count_compiles(monkeypatch):
    calls = []
    real = _nvrtc.compile_cubin
    monkeypatch.setattr(_nvrtc, "compile_cubin", lambda *a, **k: (calls.append(a[2]), real(*a, **k))[1])
    return calls


def test_cubin_is_compiled_once_then_loaded_and_rebuilt_when_damaged(cache, monkeypatch, capsys):
    require_nvrtc()
    calls = _count_compiles(monkeypatch)
    name = _variants()[0]
    first = _nvrtc.cubin(name, "90")
    assert first[0][:4] == b"\x7fELF" and first[1].startswith("_Z") and len(calls) == 1
    assert _nvrtc.cubin(name, "90") == first and len(calls) == 1
    entry, = (cache / "cuda").iterdir()
    assert sorted(p.name for p in entry.iterdir() if not p.name.endswith(".lock")) == [
        "kernel.cubin", "kernel.cubin.sha256", "name", "name.sha256"]
    (entry / "kernel.cubin").write_bytes(first[0][:100])  # truncated
    assert _nvrtc.cubin(name, "90") == first and len(calls) == 2
    assert "does not match its digest" in capsys.readouterr().err
    (entry / "name").write_text("_Zwrong")
    assert _nvrtc.cubin(name, "90") == first and len(calls) == 3


def test_threads_asking_for_one_variant_compile_it_once(cache, monkeypatch):
    require_nvrtc()
    calls = _count_compiles(monkeypatch)
    name, results = _variants()[0], []
    threads = [threading.Thread(target=lambda: results.append(_nvrtc.cubin(name, "90"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1 and len(calls) == 1


def test_prebuild_compiles_in_parallel_and_later_calls_load(cache, monkeypatch):
    require_nvrtc()
    calls = _count_compiles(monkeypatch)
    names = _variants()[:2]
    seconds = _nvrtc.prebuild(names + names[:1], "90", jobs=2)
    assert isinstance(seconds, float) and seconds > 0 and sorted(c[0] for c in calls) == sorted(names)
    monkeypatch.setattr(_nvrtc, "compile_cubin", lambda *a, **k: pytest.fail("compiled again"))
    for name in names:
        assert _nvrtc.cubin(name, 90)[1].startswith("_Z")  # 90 and '90' are one architecture
    assert _nvrtc.prebuild([], "90") >= 0


def test_the_launcher_loads_what_nvrtc_built(cache, monkeypatch):
    """The GPU path up to the CUDA call: _cuda loads the cached cubin of the device's
    architecture and looks up the mangled name NVRTC gave (the device and module are stand-ins)."""
    require_nvrtc()
    import cupy
    from cupy.cuda import function as cuda_function

    from sj_temporal_fusion import _cuda
    loaded = {}

    class Device:
        compute_capability = "90"

        def __init__(self, index):
            loaded["device"] = index

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Module:
        def load(self, cubin):
            loaded["cubin"] = cubin

        def get_function(self, mangled):
            loaded["mangled"] = mangled
            return types.SimpleNamespace(mangled=mangled)

    monkeypatch.setattr(cupy.cuda, "Device", Device)
    monkeypatch.setattr(cuda_function, "Module", Module)
    name = _variants()[0]
    _cuda._function.cache_clear()
    try:
        _, function = _cuda._function(name, 3)
    finally:
        _cuda._function.cache_clear()
    assert loaded == {"device": 3, "cubin": _nvrtc.cubin(name, "90")[0], "mangled": _nvrtc.cubin(name, "90")[1]}
    assert function.mangled.startswith("_Z")


# ---------------------------------------------------------------- the module's place

def _imports(module: str) -> set:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
    return found


def test_no_import_cycle_between_the_gpu_modules():
    assert not _imports("_nvrtc") & {"_cuda", "_sass"}
    assert "_sass" not in _imports("_cuda") and "_cuda" not in _imports("_sass")


def test_only_one_function_calls_cupys_nvrtc_bindings():
    text = (PACKAGE / "_nvrtc.py").read_text()
    body = text.split("def _compile_program", 1)[1].split("\ndef ", 1)[0]
    for call in ("createProgram", "compileProgram", "getCUBIN", "getLoweredName"):
        assert text.count(f"nvrtc.{call}(") == body.count(f"nvrtc.{call}(") == 1, call
    for module in ("_cuda", "_sass"):
        assert "cupy.cuda.compiler" not in (PACKAGE / f"{module}.py").read_text()
        assert "_compile_using_nvrtc" not in (PACKAGE / f"{module}.py").read_text()
