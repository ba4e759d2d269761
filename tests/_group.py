"""Spawned process groups for the distributed tests: ``run_group(k, fn, *args)`` runs
``fn(rank, k, *args)`` on k gloo ranks of this machine and collects what each returned or raised."""
from __future__ import annotations

import datetime
import os
import queue
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

SPAWN_TIMEOUT = 150  # s a rank may stay silent (start and imports, or between progress() calls)
_report_progress = None  # set in a rank by _entry


def progress():
    """Call from a rank's function between units of work (a parity case): the parent's deadline
    for that rank restarts. With a cold kernel cache each unit first compiles its kernels, and a
    whole group's first run (about 130 variants at k = 2) takes longer than any one hang bound."""
    if _report_progress is not None:
        _report_progress()


# ---------------------------------------------------------------- process-group harness

# What every rank imports, loaded once by the forkserver the ranks are forked from: a spawned
# rank paid ~3 s of CPU importing them, on each of the suite's dozens of ranks.
PRELOAD = ["torch", "torch.distributed", "spikingjelly.activation_based.neuron", "sj_temporal_fusion",
           "sj_temporal_fusion.distributed"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # no effect once the server runs
    return ctx


def _entry(rank, k, init_file, q, fn, args, environ, cwd):
    import warnings
    global _report_progress
    # The forkserver started with the environment and folder of the test that first needed it.
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    _report_progress = lambda: q.put((rank, "progress", None))  # noqa: E731
    import torch.distributed as dist
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the parent reports what matters
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=k,
                                timeout=datetime.timedelta(seconds=60))
        q.put((rank, "ok", fn(rank, k, *args)))
    except BaseException as exc:  # reported to the parent, which fails the test
        q.put((rank, "raised", (type(exc).__name__, str(exc), traceback.format_exc())))
    finally:
        q.close()
        q.join_thread()  # flush the result before leaving
        os._exit(0)  # skip destroy_process_group: a peer may be dead on purpose


def run_group(k, fn, *args, tmp_path, timeout=SPAWN_TIMEOUT, expect_dead=()):
    """Run ``fn(rank, k, *args)`` on k gloo ranks, forked from a server that has the imports.
    Returns {rank: ("ok", result) or ("raised", (type, message, traceback))}; ranks in
    ``expect_dead`` may report nothing."""
    ctx = _context()
    q = ctx.Queue()
    init_file = tmp_path / f"init_{fn.__name__}_{k}_{time.monotonic_ns()}"
    here = (dict(os.environ), os.getcwd())
    procs = [ctx.Process(target=_entry, args=(r, k, str(init_file), q, fn, args, *here), daemon=True)
             for r in range(k)]
    for p in procs:
        p.start()
    results, last_heard = {}, dict.fromkeys(range(k), time.monotonic())
    want = set(range(k)) - set(expect_dead)
    try:
        while not want <= set(results):
            waiting = want - set(results)
            deadline = min(last_heard[r] for r in waiting) + timeout
            try:
                rank, status, payload = q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                silent = sorted(r for r in waiting if time.monotonic() - last_heard[r] >= timeout)
                if not silent:
                    continue
                pytest.fail(f"ranks {silent} of {k} reported nothing for {timeout} s (hung?)")
            last_heard[rank] = time.monotonic()
            if status != "progress":
                results[rank] = (status, payload)
    finally:
        for p in procs:
            p.join(timeout=1)
            if p.is_alive():
                p.kill()
                p.join()
    return results


def results_ok(results):
    failed = {r: v[1] for r, v in results.items() if v[0] != "ok"}
    assert not failed, "\n".join(f"rank {r} raised {t}: {m}\n{tb}" for r, (t, m, tb) in failed.items())
    return {r: v[1] for r, v in results.items()}
