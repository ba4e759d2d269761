import dataclasses
import json
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

# Before torch loads libgomp (it reads this once): threads waiting at a parallel region's end sleep
# instead of spinning. While one of the 2 cores is busy (the background GPU compile below, g++,
# spawned ranks), a spinning waiter holds the core its partner needs: Spiking-ResNet18's training
# step at T=2, batch 2, 16 x 16 took 2.3-2.9 s so, 0.24 s passive (0.08 s either way, cores idle).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Tests run on the CPU host build unless marked gpu; keep them deterministic and quick.
torch.manual_seed(0)

# pytest-xdist (./dev test runs a worker per CPU): the workers share the CPUs, so each takes its
# share of torch's threads and of the prebuild's compiler processes.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
CPUS = len(os.sched_getaffinity(0))
if WORKERS > 1:
    torch.set_num_threads(max(1, CPUS // WORKERS))

STATE_DTYPE = {torch.float32: torch.float32, torch.float64: torch.float64,
               torch.float16: torch.float32, torch.bfloat16: torch.float32}


def has_cuda() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


# SpikingJelly generations (sj_temporal_fusion.versions): under 2.x only the modules written for it
# are collected (the others test 0.0.0.0.14's backends and clock_driven API, gone in 2.x); under
# 0.0.0.0.14 those modules skip themselves, saying why.
SJ2_MODULES = {"test_frontends_spikingjelly2.py"}


def pytest_ignore_collect(collection_path, config):
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    from sj_temporal_fusion import versions
    return True if versions.GENERATION == 2 and collection_path.name not in SJ2_MODULES else None


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true",
                     help="a fast subset: every value of every parameter of each parametrized test at least "
                          "once (so every model, surrogate and dtype), every module's tests, nothing marked slow")


# Grid factors every model shares: covered once over all models; a model's own options
# (kind, v_reset, ...) are covered per model.
SHARED_FACTORS = {"surrogate", "dtype", "store_v_seq", "T", "calls", "training", "step_mode"}


def _features(item) -> set:
    """The parameter values an item covers."""
    features = set()
    for name, value in item.callspec.params.items():
        if isinstance(value, dict):
            model = value.get("model")
            features |= {(name, None if k in SHARED_FACTORS else model, k, repr(v)) for k, v in value.items()}
        else:
            features.add((name, repr(value)))
    return features


def quick_subset(items) -> list:
    """Per test function, a greedy cover of its parameter values (each value in some kept item);
    unparametrized tests are all kept; slow ones dropped unless that would leave a module empty."""
    kept, groups = [], {}
    for item in items:
        if hasattr(item, "callspec"):
            groups.setdefault((item.module.__name__, item.originalname), []).append(item)
        else:
            kept.append(item)
    for group in groups.values():
        todo = set().union(*map(_features, group))
        while todo:
            best = max(group, key=lambda it: len(_features(it) & todo))
            kept.append(best)
            todo -= _features(best)
    chosen = {id(item) for item in kept}
    fast = [item for item in items if id(item) in chosen and "slow" not in item.keywords]
    modules = {item.module.__name__ for item in fast}
    # A module whose every kept test is slow keeps its first one, so each module still runs.
    firsts = {}
    for item in items:
        if id(item) in chosen and item.module.__name__ not in modules:
            firsts.setdefault(item.module.__name__, item)
    keep = {id(item) for item in fast} | {id(item) for item in firsts.values()}
    return [item for item in items if id(item) in keep]


def _uses_package_resources(item) -> bool:
    return "package_resources" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    if config.getoption("--quick"):
        selected = quick_subset(items)
        config.hook.pytest_deselected(items=[item for item in items if item not in set(selected)])
        items[:] = selected
    # The tests of every GPU variant's machine code run last, their modules too in one process:
    # their compile starts in the background when the run starts (pytest_collection_finish) and
    # overlaps everything else. (xdist --dist loadscope hands out the modules with most tests
    # first, so they live in one small module, tests/test_sass.py, which comes late: a worker
    # that took it earlier would wait there, its queue of other modules behind it, while the
    # compile keeps only one CPU busy.)
    waiting = {item.module.__name__ for item in items if _uses_package_resources(item)}
    items.sort(key=lambda item: (item.module.__name__ in waiting, _uses_package_resources(item)))
    if has_cuda():
        return
    reason = "needs a CUDA device and CuPy (this machine has " + (
        "no CUDA device)" if not torch.cuda.is_available() else "no CuPy)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def require_nvrtc():
    """CuPy's NVRTC module, or a skip naming why it cannot be loaded (CuPy missing, or its NVRTC
    library not loadable): the tests that compile GPU kernels without a GPU need it."""
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception as exc:
        pytest.skip(f"CuPy's NVRTC cannot be loaded here: {exc!r}")
    return nvrtc


@pytest.hookimpl(tryfirst=True)  # before an xdist worker reports its collection: tests start after
def pytest_collection_finish(session):
    """Build the host kernel variants the selected tests declare (tests/_prebuild.py) before they
    run: batched and in parallel, several times faster than one at a time from an empty cache;
    then start the GPU machine-code compile in the background if selected tests need it."""
    if session.config.option.collectonly or not session.items:
        return
    _prebuild_host_variants(session)
    _start_package_resources(session)


def _prebuild_host_variants(session):
    from sj_temporal_fusion import _host
    from _prebuild import declared_by_flags
    wanted = declared_by_flags(session.items)
    count = sum(map(len, wanted.values()))
    if not count:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    # Every xdist worker prebuilds the same list: a variant another worker is building is skipped.
    jobs = max(1, CPUS // WORKERS)
    seconds = sum(_host.prebuild(names, *flags, jobs=jobs) for flags, names in wanted.items())
    session.config.stash[_PREBUILT] = (count, seconds)
    if reporter is not None:
        reporter.write_line(f"host kernel variants declared by the selected tests: {count}, "
                            f"ready in {seconds:.0f} s (built where not cached: {_host._cache.root()})")


_PREBUILT = pytest.StashKey[tuple]()
_PACKAGE_RESOURCES = pytest.StashKey[Future]()


def _start_package_resources(session):
    """Every GPU variant through NVRTC and ptxas for sm_80 and sm_90 is minutes of CPU on one
    thread per architecture, while most tests keep one core busy: when selected tests need it
    (the ``package_resources`` fixture), it starts now, in the background, after the host
    prebuild. Under xdist only the first worker compiles; it leaves the result in a file the
    worker that runs those tests reads."""
    if session.config.option.collectonly or not any(map(_uses_package_resources, session.items)):
        return
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
        return
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception:
        return  # the fixture skips, saying why
    from sj_temporal_fusion import _sass
    shared = _shared_resources(session.config)
    shared.with_suffix(".started").touch()

    def compile_and_share():
        try:
            result = _sass.package_resources(_sass.ARCHS)
        except BaseException as exc:
            shared.with_suffix(".error").write_text(repr(exc))
            raise
        tmp = shared.with_suffix(".tmp")
        tmp.write_text(json.dumps({arch: [dataclasses.asdict(r) for r in rows] for arch, rows in result.items()}))
        tmp.rename(shared)
        return result

    pool = ThreadPoolExecutor(max_workers=1)
    session.config.stash[_PACKAGE_RESOURCES] = pool.submit(compile_and_share)
    pool.shutdown(wait=False)


SHARED_COMPILE_TIMEOUT = 1800  # s; the compile takes ~3 minutes on 2 busy cores


def _shared_resources(config) -> Path:
    """Where the first xdist worker leaves ``package_resources`` (the run's temporary folder,
    shared by its workers)."""
    base = config._tmp_path_factory.getbasetemp()
    return (base.parent if hasattr(config, "workerinput") else base) / "package_resources.json"


def _shared_package_resources(config):
    """``package_resources`` compiled by the first xdist worker, once it is done; None when it
    did not start it."""
    from sj_temporal_fusion import _sass
    shared = _shared_resources(config)
    if not shared.with_suffix(".started").exists():
        return None
    deadline = time.monotonic() + SHARED_COMPILE_TIMEOUT
    while not shared.exists():
        if shared.with_suffix(".error").exists():
            pytest.fail(f"the first worker's compile failed: {shared.with_suffix('.error').read_text()}")
        if time.monotonic() > deadline:  # the first worker died mid-compile: fail, do not hang CI
            pytest.fail(f"no result from the first worker's compile in {SHARED_COMPILE_TIMEOUT} s: {shared}")
        time.sleep(1)
    rows = json.loads(shared.read_text())
    return {arch: [_sass.KernelResources(**r) for r in found] for arch, found in rows.items()}


@pytest.fixture(scope="session")
def package_resources(request):
    """``_sass.package_resources`` of every variant on sm_80 and sm_90 (registers, spills, stack)."""
    require_nvrtc()
    from sj_temporal_fusion import _sass
    future = request.config.stash.get(_PACKAGE_RESOURCES, None)
    if future is not None:
        return future.result()
    shared = _shared_package_resources(request.config)
    return shared if shared is not None else _sass.package_resources(_sass.ARCHS)


@pytest.fixture(autouse=True)
def _launches_only_declared_variants(request, monkeypatch):
    """A test whose module declares its kernel variants may launch only those (on the host)."""
    from _prebuild import declared
    wanted = declared(request.node)
    if wanted is None:
        yield
        return
    from sj_temporal_fusion import _host
    used, original = [], _host.launch

    def recording_launch(expression, *args, count_bytes=False, **kwargs):
        used.append((expression, _host._emulate_gpu, count_bytes))
        return original(expression, *args, count_bytes=count_bytes, **kwargs)

    monkeypatch.setattr(_host, "launch", recording_launch)
    yield
    undeclared = sorted(set(used) - set(wanted))
    assert not undeclared, (f"{request.node.nodeid} launched host variants its module's kernel_variants() "
                            f"does not declare (update it): {undeclared}")


@pytest.fixture(scope="session")  # once per worker: its modules that run the grid share it
def parity_variants_built(tmp_path_factory):
    """The time-sharding parity cases' ~130 host variants (tests/_parity.py; test_distributed and
    test_distributed_transport run them), found by a planning run of the ranks and built in
    parallel batches before the timed groups start (one at a time inside the ranks, from an empty
    cache, they took minutes). Every k launches the same variants (only T differs)."""
    from sj_temporal_fusion import _host
    from _group import results_ok, run_group
    from _parity import parity_cases, planning_worker
    planned = results_ok(run_group(2, planning_worker, parity_cases(2), tmp_path=tmp_path_factory.mktemp("plan")))
    _host.prebuild(dict.fromkeys(name for r in sorted(planned) for name in planned[r]))
