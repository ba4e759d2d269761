"""python -m sj_temporal_fusion.bench tune: sweep the kernels' launch shape and report the best.

    CUDA  threads per block (``_cuda.BLOCK``) x neurons per thread (``_cuda.LANES``, compiled in
          as TF_LANES; lanes of a thread are blockDim apart, so loads stay coalesced)
    CPU   neurons per emulated thread of the host build (``_host.LANES``: contiguous lanes, the
          vectorised loop; each value is one g++ build, about 10-20 s)

A shape whose kernels cannot launch (registers per thread x threads per block above the SM's
65,536-register file: the fp32 LIF backward at 4 lanes used ~174 registers before the launch bounds, so 512 x 4 failed with
CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES) is skipped with the ptxas register count as the reason
(``_sass``: the kernels compiled for the device's architecture with that shape's options); any
other failure of one shape is recorded as an error row and the sweep goes on.

Each configuration times one LIF layer (the Fig. 5 neuron) through ``functional.lif_multi_step``
in 'infer' and 'train' mode, after checking that its spikes equal those of the shipped
configuration. The shipped values are put back afterwards; the winner is a proposal to copy
into ``_cuda.py`` / ``_host.py``, not applied.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
from pathlib import Path

import torch

from .. import _sass
from . import harness, lif, traffic

CUDA_BLOCKS = (64, 128, 256, 512, 1024)
CUDA_LANES = (1, 2, 4, 8)
HOST_LANES = (8, 16, 32, 64, 128)


@contextlib.contextmanager
def launch_shape(device: torch.device, block: int, lanes: int):
    """Temporarily rebuild the kernels with ``lanes`` neurons per thread (and ``block`` threads per
    block on CUDA)."""
    if device.type == "cuda":
        from .. import _cuda as build
        saved = (build.BLOCK, build.LANES, build.OPTIONS)
        build.BLOCK, build.LANES = block, lanes
        build.OPTIONS = build.options_for(block, lanes)
        build._function.cache_clear()
        try:
            yield
        finally:
            build.BLOCK, build.LANES, build.OPTIONS = saved
            build._function.cache_clear()
    else:
        from .. import _host as build
        saved = build.LANES
        build.LANES = lanes  # -DTF_LANES of every variant built from here on
        build.library.cache_clear()
        try:
            yield
        finally:
            build.LANES = saved
            build.library.cache_clear()


def launched_kernels(mode: str, dtype: torch.dtype) -> list[str]:
    """Name expressions of the kernels one ``_step`` launches (Fig. 5 neuron: Sigmoid surrogate)."""
    from .. import surrogate as specs, variants
    from ..neurons import REGISTRY
    model = REGISTRY["lif"]
    options = dict(model.defaults, kind="lif", **lif.FIG5)
    names = [variants.forward_variant(model, dtype, model.forward_form(options))]
    if mode == "train":
        names.append(variants.backward_variant(model, dtype, specs.spec(lif.surrogate()).id, model.form(options), False))
    return names


def kernel_resources(names: list[str], arch: str) -> list[_sass.KernelResources]:
    """ptxas resources of ``names`` compiled with the CUDA build's current options (inside
    ``launch_shape`` these carry that shape's lanes) for ``sm_<arch>``."""
    from .. import _cuda
    return list(_cached_resources(_cuda.source(), tuple(_cuda.OPTIONS), tuple(names), arch))


@functools.lru_cache(maxsize=None)
def _cached_resources(source: str, options: tuple, names: tuple, arch: str):
    return tuple(_sass.resources(source, options, names, arch))


def launch_problem(block: int, resources: list[_sass.KernelResources]) -> str | None:
    """Why ``block`` threads per block cannot launch these kernels, or None when they can."""
    bad = [r for r in resources if not _sass.fits(r.registers, block)]
    if not bad:
        return None
    return "; ".join(
        f"{r.name} uses {r.registers} registers (ptxas, sm_{r.arch}): {block} threads need "
        f"{-(-block // 32) * _sass.warp_registers(r.registers):,} > {_sass.REGISTER_FILE:,} registers per SM"
        for r in bad)


def _step(mode: str, x: torch.Tensor, grad):
    from ..functional import lif_multi_step
    kwargs = dict(kind="lif", surrogate_function=lif.surrogate(), **lif.FIG5)
    if mode == "infer":
        def step():
            with torch.no_grad():
                return lif_multi_step(x, **kwargs)[0]
    else:
        def step():
            x.grad = None
            spike = lif_multi_step(x, **kwargs)[0]
            spike.backward(grad)
            return spike
    return step


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--neurons", type=int, default=None, help="default 1,000,000 on CUDA, 262,144 on CPU")
    p.add_argument("--T", type=int, default=32, help="time steps (default 32)")
    p.add_argument("--dtypes", default="fp32", help="fp32,fp16,bf16 (default fp32)")
    p.add_argument("--blocks", default=",".join(map(str, CUDA_BLOCKS)), help="CUDA threads per block")
    p.add_argument("--lanes", default=None,
                   help=f"neurons per thread (default {CUDA_LANES} on CUDA, {HOST_LANES} on CPU)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--max-seconds", type=float, default=2.0)


def main(args) -> dict:
    device = harness.resolve_device(args.device)
    N = args.neurons or (1_000_000 if device.type == "cuda" else 262_144)
    blocks = harness.parse_ints(args.blocks) if device.type == "cuda" else [1]
    lanes = harness.parse_ints(args.lanes) if args.lanes else list(CUDA_LANES if device.type == "cuda" else HOST_LANES)
    dtypes = [harness.DTYPES[d] for d in harness.parse_names(args.dtypes, harness.DTYPES, "dtype")]
    env = harness.environment(device)
    env["cpu_allocator"] = getattr(args, "cpu_allocator_setting", None)
    copy = harness.copy_bandwidth(device)
    flush = harness.CacheFlusher(device)
    inputs = {(m, d): lif.make_inputs(args.T, N, d, device, m) for m in lif.MODES for d in dtypes}
    expected = {key: _step(key[0], *inputs[key])().detach().clone() for key in inputs}
    rows = []
    bar = harness.progress(len(blocks) * len(lanes) * len(inputs), "tune", enabled=not args.quiet)
    for block in blocks:
        for lane in lanes:
            with launch_shape(device, block, lane):
                for (mode, dtype), (x, grad) in inputs.items():
                    row = {"block": block if device.type == "cuda" else None, "lanes": lane, "mode": mode,
                           "dtype": harness.DTYPE_NAMES[dtype], "T": args.T, "N": N}
                    try:
                        problem = None
                        if device.type == "cuda":
                            major, minor = torch.cuda.get_device_capability(device)
                            problem = launch_problem(block, kernel_resources(launched_kernels(mode, dtype),
                                                                             f"{major}{minor}"))
                        if problem is not None:
                            row.update(status="skipped", reason=problem)
                        else:
                            step = _step(mode, x, grad)
                            if not torch.equal(step().detach(), expected[(mode, dtype)]):
                                row.update(status="check_failed", reason="spikes differ from the shipped launch shape")
                            else:
                                t = harness.time_fn(step, device, warmup=2, reps=args.reps,
                                                    max_seconds=args.max_seconds, flush=flush)
                                design = traffic.step_traffic(mode, args.T, N, dtype, "lif").total
                                row.update(status="ok", **t.summary(),
                                           fraction_of_copy_bw=design / (t.median_ms / 1e3) / 1e9 / copy["gb_per_s"])
                    except Exception as exc:  # noqa: BLE001 - one failing shape must not end the sweep
                        row.update(status="error", reason=lif.error_reason(exc))
                    finally:
                        x.grad = None
                    rows.append(row)
                    bar.update(1)
    bar.close()
    best = {}
    for r in rows:
        if r["status"] == "ok":
            key = f"{r['mode']}/{r['dtype']}"
            if key not in best or r["median_ms"] < best[key]["median_ms"]:
                best[key] = r
    payload = {"benchmark": "tune", "environment": harness.finish_environment(env), "copy_bandwidth": copy,
               "config": {"T": args.T, "neurons": N, "blocks": blocks, "lanes": lanes},
               "results": rows, "best": best}
    name = args.name or f"tune-{device.type}"
    out = Path(args.out)
    harness.write_json(out / f"{name}.json", payload)
    harness.write_csv(out / f"{name}.csv", rows, ["block", "lanes", "mode", "dtype", "T", "N", "status",
                                                  "median_ms", "p25_ms", "p75_ms", "reps", "fraction_of_copy_bw"])
    print(f"{'block':>6}{'lanes':>6}  {'mode':<6}{'dtype':<6}{'median ms':>11}{'of copy':>9}")
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['block'] or '-':>6}{r['lanes']:>6}  {r['mode']:<6}{r['dtype']:<6}{r['median_ms']:>11.3f}"
                  f"{r['fraction_of_copy_bw']:>9.2f}")
        else:
            print(f"{r['block'] or '-':>6}{r['lanes']:>6}  {r['mode']:<6}{r['dtype']:<6}  {r['status']}: {r['reason']}")
    for key, r in best.items():
        print(f"best {key}: block={r['block']}, lanes={r['lanes']}, {r['median_ms']:.3f} ms")
    return payload
