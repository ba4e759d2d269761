"""The host build (``_host``) and its cache (``_cache``): one variant compiled when first used and
announced once, a damaged cached library rebuilt instead of loaded, a missing compiler named,
parallel processes building one variant once."""
import multiprocessing as mp
import subprocess
import sys

import pytest
import torch

from sj_temporal_fusion import _host

CODE = ("import torch, sj_temporal_fusion as tf; torch.manual_seed(0); x = torch.randn(5, 70); "
        "s, v, _ = tf.lif_multi_step(x, tau=1.5, v_threshold=0.3); print(float(s.sum()), float(v.sum()))")


def _run(cache, **env):
    import os
    full = dict(os.environ, SJ_TF_CACHE=str(cache), **env)
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=full, timeout=300)


def _libraries(cache):
    return sorted((cache / "host").glob("*/libtf.so"))


def test_first_call_compiles_one_variant_and_says_where(tmp_path):
    first = _run(tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("compiling CPU kernels") == 1 and str(tmp_path / "host") in first.stderr
    assert len(_libraries(tmp_path)) == 1  # the forward variant this call needs, nothing else
    again = _run(tmp_path)
    assert again.returncode == 0 and "compiling" not in again.stderr  # cached
    assert again.stdout == first.stdout


@pytest.mark.parametrize("damage", ["truncate", "zero_middle"])
def test_a_damaged_cached_library_is_rebuilt(tmp_path, damage):
    good = _run(tmp_path)
    assert good.returncode == 0, good.stderr
    (lib,) = _libraries(tmp_path)
    data = bytearray(lib.read_bytes())
    if damage == "truncate":
        lib.write_bytes(bytes(data[: len(data) // 3]))
    else:
        middle = len(data) // 2
        data[middle:middle + 4096] = bytes(4096)
        lib.write_bytes(bytes(data))
    again = _run(tmp_path)
    assert again.returncode == 0, again.stderr  # no bus error, no segfault
    assert "does not match its digest" in again.stderr and str(lib) in again.stderr
    assert again.stdout == good.stdout
    assert len(lib.read_bytes()) == len(data)  # rebuilt in place, whole again


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
