"""The host build (``_host``) and its cache (``_cache``): one variant compiled when first used and
announced once, a damaged cached library rebuilt instead of loaded, a missing compiler named,
parallel processes building one variant once."""
import multiprocessing as mp
import shutil
import subprocess
import sys

import pytest
import torch

from sj_temporal_fusion import _host
from sj_temporal_fusion.functional import lif_multi_step
from sj_temporal_fusion.reference import lif_reference

CODE = ("import torch, sj_temporal_fusion as tf; torch.manual_seed(0); x = torch.randn(5, 70); "
        "s, v, _ = tf.lif_multi_step(x, tau=1.5, v_threshold=0.3); print(float(s.sum()), float(v.sum()))")


def _run(cache, **env):
    import os
    full = dict(os.environ, SJ_TF_CACHE=str(cache), **env)
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=full, timeout=300)


def _libraries(cache):
    return sorted((cache / "host").glob("*/libtf.so"))


@pytest.fixture(scope="module")
def first_call(tmp_path_factory):
    """A first call from an empty cache, in a fresh process: (cache folder, its result). The
    tests below start from copies of that cache (each process is seconds of CPU)."""
    cache = tmp_path_factory.mktemp("first-call")
    return cache, _run(cache)


def _copy_of(first_call, tmp_path):
    cache, result = first_call
    assert result.returncode == 0, result.stderr
    shutil.copytree(cache, tmp_path / "cache")
    return tmp_path / "cache", result


@pytest.mark.slow  # compiles in subprocesses
def test_first_call_compiles_one_variant_and_says_where(first_call, tmp_path):
    cache, first = first_call
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("compiling CPU kernels") == 1 and str(cache / "host") in first.stderr
    assert len(_libraries(cache)) == 1  # the forward variant this call needs, nothing else
    cache, _ = _copy_of(first_call, tmp_path)
    again = _run(cache)
    assert again.returncode == 0 and "compiling" not in again.stderr  # cached
    assert again.stdout == first.stdout


@pytest.mark.slow  # compiles in subprocesses
@pytest.mark.parametrize("damage", ["truncate", "zero_middle"])
def test_a_damaged_cached_library_is_rebuilt(first_call, tmp_path, damage):
    cache, good = _copy_of(first_call, tmp_path)
    (lib,) = _libraries(cache)
    data = bytearray(lib.read_bytes())
    if damage == "truncate":
        lib.write_bytes(bytes(data[: len(data) // 3]))
    else:
        middle = len(data) // 2
        data[middle:middle + 4096] = bytes(4096)
        lib.write_bytes(bytes(data))
    again = _run(cache)
    assert again.returncode == 0, again.stderr  # no bus error, no segfault
    assert "does not match its digest" in again.stderr and str(lib) in again.stderr
    assert again.stdout == good.stdout
    assert len(lib.read_bytes()) == len(data)  # rebuilt in place, whole again


@pytest.mark.slow  # a subprocess
def test_missing_compiler_is_named(tmp_path):
    out = _run(tmp_path, CXX="/nonexistent/g++")
    assert out.returncode != 0
    assert "'/nonexistent/g++' was not found" in out.stderr and "apt-get install g++" in out.stderr


def test_compile_errors_show_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SJ_TF_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="(?s)host build of kernel no_such_kernel<int> failed:.*g\\+\\+.*no_such_kernel"):
        _host.library("no_such_kernel<int>", False, False)


def _build_in_child(cache, queue):
    import os
    os.environ["SJ_TF_CACHE"] = cache
    from sj_temporal_fusion import _host as host
    from sj_temporal_fusion.neurons import REGISTRY
    from sj_temporal_fusion.variants import forward_variant
    host.library(forward_variant(REGISTRY["qif"], torch.float32, 1), False, False)
    queue.put("ok")


@pytest.mark.slow  # compiles in subprocesses
def test_parallel_processes_build_a_variant_once(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [queue.get(timeout=5) for _ in procs] == ["ok", "ok"]
    assert len(_libraries(tmp_path)) == 1
    assert not list((tmp_path / "host").glob("*/*.tmp"))


def _lif_variants():
    from sj_temporal_fusion.neurons import REGISTRY
    from sj_temporal_fusion.variants import backward_variant, forward_variant
    m = REGISTRY["lif"]
    return [forward_variant(m, torch.float32, m.forward_form({**m.defaults})),
            forward_variant(m, torch.float64, m.forward_form({**m.defaults})),
            backward_variant(m, torch.float32, 2, m.form({**m.defaults}), False)]


def test_prebuild_builds_several_variants_per_compiler_run_and_library_reuses_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SJ_TF_CACHE", str(tmp_path))
    runs = []
    real_run = subprocess.run
    monkeypatch.setattr(_host.subprocess, "run", lambda cmd, **kw: runs.append(cmd) or real_run(cmd, **kw))
    expressions = _lif_variants()
    _host.prebuild(expressions + expressions[:1], jobs=1)  # duplicates are built once
    assert len(runs) == 1 and len(_libraries(tmp_path)) == 3
    assert not list((tmp_path / "host").glob("*/build.*/"))  # the batch's work folder is gone
    _host.library.cache_clear()
    monkeypatch.setattr(_host, "_build", lambda variants: pytest.fail(f"rebuilt {variants}"))
    try:
        x = torch.randn(6, 70)
        ours, _, _ = lif_multi_step(x, tau=2.0)  # the prebuilt fp32 forward
        assert torch.equal(ours, lif_reference(x, tau=2.0)[0])
    finally:
        _host.library.cache_clear()


def test_prebuild_leaves_a_variant_being_built_elsewhere_to_its_builder(tmp_path, monkeypatch):
    monkeypatch.setenv("SJ_TF_CACHE", str(tmp_path))
    first, *rest = [_host._Variant(e, False, False) for e in _lif_variants()]
    with _host._lock(first):  # another builder holds it
        _host.prebuild([first.expression, *(v.expression for v in rest)], jobs=1)
    assert not first.library_path.exists()
    assert all(_host._cache.is_verified(v.library_path) for v in rest)
