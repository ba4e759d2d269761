"""bench shard (sj_temporal_fusion/bench/shard.py) and its speedup models (bench/shard_model.py)."""
import pytest

import sj_temporal_fusion  # noqa: F401


def test_eq5_and_its_optimum():
    from sj_temporal_fusion.bench import shard_model as model
    assert model.eq5_speedup(1, 100.0, 1.0) == 1.0
    assert abs(model.eq5_best_k(100.0, 1.0) - 10.0) < 1e-12
    mus = [model.eq5_speedup(k, 100.0, 1.0) for k in range(1, 30)]
    assert max(range(len(mus)), key=mus.__getitem__) + 1 == 10  # the integer optimum is sqrt(Ts/Tc)
    fix = model.Fixup(mean=5.0, warp_max_mean=11.0, max=18.0)
    one = model.predict(10 ** 6, 1024, 1, fix, training=True)
    four = model.predict(10 ** 6, 1024, 4, fix, training=True)
    assert one["forward_s"] == one["one_gpu_forward_s"] and four["forward_s"] < one["forward_s"]
    assert four["backward_s"] < one["backward_s"]


@pytest.mark.slow  # process groups
def test_bench_shard_runs_small(tmp_path):
    """The benchmark end to end at a toy size (gaussian input only): rows, timings, figures."""
    import argparse
    from sj_temporal_fusion.bench import shard
    p = argparse.ArgumentParser()
    for flag, default in (("--device", "cpu"), ("--out", str(tmp_path)), ("--name", None)):
        p.add_argument(flag, default=default)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    shard.add_arguments(p)
    args = p.parse_args(["--quiet", "--inputs", "gaussian", "--configs", "lif-tau2,lif-tau1.25,if-soft",
                         "--dtypes", "fp32", "--neurons", "4096", "--warmup-steps", "16", "--horizon", "48",
                         "--reps", "1"])  # timings' values are not checked here; each rep flushes the cache
    payload = shard.main(args)
    rows = {r["config"]: r for r in payload["measured"]["fixup"]}
    assert rows["if-soft"]["unmatched_fraction"] == 1.0  # soft-reset IF never forgets its start
    assert rows["lif-tau1.25"]["max"] < 48 and rows["lif-tau1.25"]["mean"] < rows["lif-tau2"]["mean"]
    assert set(payload["modelled"]["fig6"]) == {"lif-tau2", "lif-tau1.25"}
    assert (tmp_path / "shard-cpu.json").exists() and (tmp_path / "shard-cpu-fig4-eq5.png").exists()
