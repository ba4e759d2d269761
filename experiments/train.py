"""Train and test one Table 1 cell and write OUT/metrics.json and OUT/train.log.

    python experiments/train.py --config configs/mnist_resnet18.yaml --backend temporal_fusion
    torchrun --nproc_per_node 4 experiments/train.py --config configs/cifar10_resnet34.yaml

Timing: every clock read waits for the device. A batch's time is split into data (waiting for
the DataLoader plus the copy to the device) and compute (Poisson encoding on the device, forward,
backward, optimiser step, neuron reset); the epoch's wall time is reported too. The paper's code
drew the Poisson spikes on the CPU inside its timed loop; here they are drawn on the device.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import statistics
import sys
import warnings
from copy import deepcopy
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file (python experiments/train.py, torchrun): import as a package
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

# SpikingJelly 0.0.0.0.14 scripts its torch-backend neurons at import; torch 2.14 warns on each.
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional
from torch.utils.data import DataLoader
from tqdm import tqdm

from sj_temporal_fusion.compat import numpy_int_alias

from experiments import config as configs
from experiments import data, model as models, runtime as rt

METRICS_SCHEMA = 1
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Config keys (--set KEY=VALUE):\n" + configs.describe())
    p.add_argument("--config", required=True, help="a config file, e.g. configs/mnist_resnet18.yaml")
    p.add_argument("--backend", choices=configs.BACKENDS)
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-batches", type=int, help="batches per train and per test pass")
    p.add_argument("--dataset", choices=configs.DATASETS,
                   help="synthetic keeps the config's dataset shape (timing only)")
    p.add_argument("--data-root")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=configs.AMP_MODES)
    p.add_argument("--repeats", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set T=4 --set batch_size=8")
    p.add_argument("--out", help="output folder (default runs/<config name>/<backend>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def overrides(args: argparse.Namespace) -> dict:
    """Config overrides from the command line, --set first so that named flags win."""
    result = dict(configs.parse_assignment(text) for text in args.set)
    for flag, key in (("dataset", "dataset"), ("backend", "backend"), ("epochs", "epochs"),
                      ("max_batches", "max_batches"), ("data_root", "data_root"),
                      ("device", "device"), ("amp", "amp"), ("repeats", "repeats")):
        value = getattr(args, flag)
        if value is not None:
            result[key] = value
    return result


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    """Run from the command line; returns the metrics (on the main process)."""
    args = parser().parse_args(argv)
    try:
        config = configs.load(args.config, overrides(args))
    except configs.ConfigError as error:
        parser().error(str(error))
    out = Path(args.out or Path("runs") / config["name"] / config["backend"])
    try:
        runtime = rt.start(config["device"])
        try:
            return run(config, out, runtime, progress=not args.no_progress)
        finally:
            rt.stop(runtime)
    except (configs.ConfigError, FileNotFoundError) as error:  # the message says what to do
        raise SystemExit(f"train.py: {error}") from None


def _logger(out: Path, runtime: rt.Runtime) -> logging.Logger:
    log = logging.getLogger(f"experiments.train.{id(out)}")
    log.setLevel(logging.INFO if runtime.main else logging.WARNING)
    log.propagate = False
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if runtime.main:
        handlers.append(logging.FileHandler(out / "train.log", mode="w"))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    return log


def run(config: dict, out: Path, runtime: rt.Runtime, progress: bool = True) -> Optional[dict]:
    """Train and test ``config`` ``repeats`` times; the main process writes out/metrics.json."""
    models.check_backend(config["backend"], runtime.device)
    if config["batch_size"] % runtime.world:
        raise configs.ConfigError(f"batch_size {config['batch_size']} is global and must be "
                                  f"divisible by the {runtime.world} processes")
    out.mkdir(parents=True, exist_ok=True)
    log = _logger(out, runtime)
    # SpikingJelly 0.0.0.0.14's cupy backend uses np.int, removed in NumPy 1.24: the alias exists
    # only while a cupy run runs (sj_temporal_fusion.compat).
    shim = numpy_int_alias() if config["backend"] == "cupy" else contextlib.nullcontext()
    try:
        with shim:
            return _run(config, out, runtime, progress, log)
    finally:
        for handler in list(log.handlers):
            handler.close()
            log.removeHandler(handler)


def _run(config, out, runtime, progress, log) -> Optional[dict]:
    started = datetime.datetime.now(datetime.timezone.utc)
    environment = rt.environment(runtime)
    spec = data.spec_of(config)
    synthetic = config["dataset"] == "synthetic"
    log.info("%s: %s on %s, backend %s, T=%d, batch %d, %d epoch(s) x %d repeat(s), device %s%s",
             config["name"], config["arch"], spec.label + (" (synthetic)" if synthetic else ""),
             config["backend"], config["T"], config["batch_size"], config["epochs"],
             config["repeats"], runtime.device, f", {runtime.world} processes" if runtime.world > 1 else "")
    v = environment["versions"]
    log.info("%s | torch %s, SpikingJelly %s, sj-temporal-fusion %s, CuPy %s | commit %s",
             environment["device"]["name"], v["torch"], v["spikingjelly"], v["sj_temporal_fusion"],
             v["cupy"] or "absent", (environment["git"]["commit"] or "unknown")[:10])
    if synthetic:
        log.info(data.SYNTHETIC_NOTE.format(label=spec.label))
    train_set, test_set = data.load(config)
    local_batch = config["batch_size"] // runtime.world
    samplers = {
        "train": data.ShardSampler(len(train_set), config["batch_size"], runtime.world, runtime.rank,
                                   shuffle=True, drop_last=True),
        "test": data.ShardSampler(len(test_set), config["batch_size"], runtime.world, runtime.rank),
    }
    loaders = {phase: DataLoader(dataset, batch_size=local_batch, sampler=samplers[phase],
                                 num_workers=config["num_workers"],
                                 pin_memory=runtime.device.type == "cuda",
                                 persistent_workers=config["num_workers"] > 0)
               for phase, dataset in (("train", train_set), ("test", test_set))}
    encoder = data.Encoder(spec, config["T"], config["static_encoding"], runtime.device,
                           DTYPES[config["dtype"]], runtime.world, runtime.rank)
    repeats, warmup_seconds = [], None
    for repeat in range(config["repeats"]):
        seed = config["seed"] + repeat
        torch.manual_seed(seed)  # the same initial weights on every process and for every backend
        net = models.build(config, spec.classes).to(runtime.device, DTYPES[config["dtype"]])
        if runtime.world > 1 and config["sync_batchnorm"]:
            net = models.convert_sync_batchnorm(net)
        if warmup_seconds is None:
            warmup_seconds = _warmup(net, config, spec, runtime)
            log.info("warm-up (untimed in the epochs): %.2f s", warmup_seconds)
        repeats.append(_repeat(net, config, seed, loaders, samplers, encoder, runtime, log, progress))
    if not runtime.main:
        return None
    finished = datetime.datetime.now(datetime.timezone.utc)
    metrics = {
        "schema": METRICS_SCHEMA,
        "name": config["name"],
        "dataset": config["dataset"],
        "data": {"name": config["synthetic_like"] or config["dataset"], "label": spec.label,
                 "kind": spec.kind, "train_size": len(train_set), "test_size": len(test_set)},
        "arch": config["arch"],
        "backend": config["backend"],
        "synthetic": synthetic,
        "accuracy_meaningful": not synthetic,
        "note": data.SYNTHETIC_NOTE.format(label=spec.label) if synthetic else None,
        "world_size": runtime.world,
        "warmup_seconds": warmup_seconds,
        "summary": summarise(repeats),
        "repeats": repeats,
        "config": config,
        "environment": environment,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": finished.isoformat(timespec="seconds"),
        "total_seconds": (finished - started).total_seconds(),
    }
    path = out / "metrics.json"
    path.with_suffix(".json.tmp").write_text(json.dumps(metrics, indent=2) + "\n")
    path.with_suffix(".json.tmp").replace(path)
    s = metrics["summary"]
    log.info("best accuracy %.2f%%%s | train %.2f s/epoch, test %.2f s/epoch (compute; data %.2f + "
             "%.2f s) | %.1f train samples/s | peak memory %.1f MiB -> %s",
             s["best_accuracy"], " (meaningless: synthetic data)" if synthetic else "",
             s["train_seconds"], s["test_seconds"], s["train_data_seconds"], s["test_data_seconds"],
             s["train_samples_per_s"], s["peak_memory_bytes"] / 2**20, path)
    return metrics


def _warmup(net, config, spec, runtime) -> float:
    """Seconds of ``warmup_batches`` train steps and one test forward on a copy of ``net``
    (the copy keeps the real model's weights and BatchNorm statistics untouched)."""
    if config["warmup_batches"] == 0:
        return 0.0
    copy = deepcopy(net).train()
    x = torch.zeros((config["T"], config["batch_size"] // runtime.world, data.RESNET_CHANNELS)
                    + spec.shape[1:], device=runtime.device, dtype=DTYPES[config["dtype"]])
    start = runtime.clock()
    for _ in range(config["warmup_batches"]):
        with _autocast(config, runtime):
            loss = copy(x).float().mean()
        loss.backward()
        functional.reset_net(copy)
    _test_mode(copy, config)
    for _ in range(config["warmup_batches"]):  # the eval path is TorchScript too: warm it the same
        with torch.no_grad(), _autocast(config, runtime):
            copy(x)
        functional.reset_net(copy)
    return runtime.clock() - start


def _test_mode(net, config) -> None:
    """net.eval(); with backend cupy the LIF nodes stay in train mode (the test runs under
    no_grad, and a LIF node's mode only picks its code path): SpikingJelly 0.0.0.0.14's eval mode
    runs its TorchScript loop whatever the backend, so the cupy column would time TorchScript."""
    net.eval()
    if config["backend"] == "cupy":
        from spikingjelly.activation_based import neuron
        for m in net.modules():
            if isinstance(m, neuron.LIFNode):
                m.train()


def _repeat(net, config, seed, loaders, samplers, encoder, runtime, log, progress) -> dict:
    trained = net
    if runtime.world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    optimizer = torch.optim.Adam(net.parameters(), lr=config["lr"])
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=config["amp"] == "fp16")
    for sampler in samplers.values():
        sampler.seed = seed
    rt.reset_peak_memory(runtime.device)
    epochs = []
    for epoch in range(config["epochs"]):
        samplers["train"].set_epoch(epoch)
        encoder.reseed((seed * 1_000_003 + epoch) * 2)
        record = {"epoch": epoch + 1}
        record.update(_train_epoch(trained, optimizer, scaler, loaders["train"], samplers["train"],
                                   encoder, config, runtime, progress, f"{epoch + 1}/{config['epochs']}"))
        encoder.reseed((seed * 1_000_003 + epoch) * 2 + 1)
        record.update(_test_epoch(net, loaders["test"], samplers["test"], encoder, config, runtime,
                                  progress, f"{epoch + 1}/{config['epochs']}"))
        epochs.append(record)
        log.info("seed %d epoch %s: train %.2f s compute + %.2f s data (%.1f samples/s), loss %.4f"
                 " | test %.2f s compute + %.2f s data, accuracy %.2f%% (%d samples)",
                 seed, record["epoch"], record["train_seconds"], record["train_data_seconds"],
                 record["train_samples_per_s"], record["train_loss"], record["test_seconds"],
                 record["test_data_seconds"], record["test_accuracy"], record["test_samples"])
    memory = rt.peak_memory(runtime.device)
    memory["bytes"] = int(runtime.reduce([memory["bytes"]], "max")[0])
    return {"seed": seed, "best_accuracy": max(e["test_accuracy"] for e in epochs),
            "peak_memory_bytes": memory["bytes"], "peak_memory_kind": memory["kind"],
            "neuron_backends": dict(models.neuron_backends(net)), "epochs": epochs}


def _timed_epoch(loader, config, runtime, desc, progress, step) -> tuple[int, float, float, float]:
    """Runs ``step(index, x, y)`` (one batch's compute, on the device) over the epoch's batches
    behind a progress bar (``step`` returns its postfix, or None). Returns (batches, compute
    seconds, data seconds, wall seconds), each time the slowest process's."""
    count = len(loader) if config["max_batches"] is None else min(len(loader), config["max_batches"])
    bar = tqdm(total=count, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
               disable=not (progress and runtime.main), file=sys.stderr)
    data_s = compute_s = 0.0
    start = runtime.clock()
    batches = iter(loader)
    for index in range(count):
        t0 = runtime.clock()
        x, y = next(batches)
        x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
        t1 = runtime.clock()
        postfix = step(index, x, y)
        t2 = runtime.clock()
        data_s, compute_s = data_s + t1 - t0, compute_s + t2 - t1
        if postfix:
            bar.set_postfix(postfix, refresh=False)
        bar.update()
    wall = runtime.clock() - start
    bar.close()
    compute_s, data_s, wall = runtime.reduce([compute_s, data_s, wall], "max")
    return count, compute_s, data_s, wall


def _autocast(config, runtime):
    return torch.autocast(runtime.device.type, dtype=AMP_DTYPES.get(config["amp"], torch.float32),
                          enabled=config["amp"] != "off")


def _train_epoch(model, optimizer, scaler, loader, sampler, encoder, config, runtime, progress,
                 epoch) -> dict:
    model.train()
    sums = {"loss": 0.0, "samples": 0}

    def step(index, x, y):
        with _autocast(config, runtime):
            out = model(encoder(x, sampler.global_batch_size(index)))
            loss = F.cross_entropy(out.mean(0), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        functional.reset_net(model)
        sums["loss"] += loss.item() * len(y)
        sums["samples"] += len(y)
        return {"loss": f"{loss.item():.4f}"}

    count, compute_s, data_s, wall = _timed_epoch(loader, config, runtime, f"epoch {epoch} train", progress, step)
    loss_sum, samples = runtime.reduce([sums["loss"], sums["samples"]])
    return {"train_seconds": compute_s, "train_data_seconds": data_s, "train_wall_seconds": wall,
            "train_batches": count, "train_samples": int(samples),
            "train_loss": loss_sum / max(samples, 1),
            "train_samples_per_s": samples / compute_s if compute_s > 0 else 0.0}


@torch.no_grad()
def _test_epoch(net, loader, sampler, encoder, config, runtime, progress, epoch) -> dict:
    # The bare network, not the DDP wrapper: testing needs no collectives, and the processes may
    # hold one test batch more or less.
    _test_mode(net, config)
    sums = {"correct": 0, "samples": 0}

    def step(index, x, y):
        with _autocast(config, runtime):
            out = net(encoder(x, sampler.global_batch_size(index)))
        sums["correct"] += int((out.mean(0).argmax(1) == y).sum())
        sums["samples"] += len(y)
        functional.reset_net(net)

    count, compute_s, data_s, wall = _timed_epoch(loader, config, runtime, f"epoch {epoch} test", progress, step)
    correct, samples = runtime.reduce([sums["correct"], sums["samples"]])
    return {"test_seconds": compute_s, "test_data_seconds": data_s, "test_wall_seconds": wall,
            "test_batches": count, "test_samples": int(samples),
            "test_accuracy": 100.0 * correct / max(samples, 1),
            "test_samples_per_s": samples / compute_s if compute_s > 0 else 0.0}


def summarise(repeats: list[dict]) -> dict:
    """Means over repeats and epochs (the paper's statistic), with medians and the spread."""
    epochs = [e for r in repeats for e in r["epochs"]]
    best = [r["best_accuracy"] for r in repeats]
    summary = {"best_accuracy": statistics.fmean(best),
               "best_accuracy_std": statistics.stdev(best) if len(best) > 1 else 0.0,
               "repeats": len(repeats), "epochs_per_repeat": len(repeats[0]["epochs"])}
    for phase in ("train", "test"):
        seconds = [e[f"{phase}_seconds"] for e in epochs]
        summary[f"{phase}_seconds"] = statistics.fmean(seconds)
        summary[f"{phase}_seconds_std"] = statistics.stdev(seconds) if len(seconds) > 1 else 0.0
        summary[f"{phase}_seconds_median"] = statistics.median(seconds)
        summary[f"{phase}_seconds_min"], summary[f"{phase}_seconds_max"] = min(seconds), max(seconds)
        for part in ("data", "wall"):
            summary[f"{phase}_{part}_seconds"] = statistics.fmean(
                e[f"{phase}_{part}_seconds"] for e in epochs)
        samples = sum(e[f"{phase}_samples"] for e in epochs)
        summary[f"{phase}_samples_per_s"] = samples / sum(seconds) if sum(seconds) > 0 else 0.0
    summary["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in repeats)
    summary["peak_memory_kind"] = repeats[0]["peak_memory_kind"]
    return summary


if __name__ == "__main__":
    main()
