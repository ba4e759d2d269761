"""Experiment configs: YAML files that inherit (``inherit: base.yaml``), checked against one schema.

``configs/base.yaml`` holds every setting the Table 1 cells share; a cell file holds only the
dataset, the architecture and the batch size. Every key is documented in ``SCHEMA`` below (print
it with ``python -m experiments.config --describe``); an unknown key, a missing key or a bad value
raises ``ConfigError`` naming the file, the key and what would be accepted.
"""
from __future__ import annotations

import argparse
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

DATASETS = ("mnist", "cifar10", "nmnist", "dvs128_gesture", "digits", "synthetic")
REAL_DATASETS = DATASETS[:-1]
ARCHS = ("spiking_resnet18", "spiking_resnet34", "spiking_resnet50")
BACKENDS = ("torch", "cupy", "temporal_fusion")
AMP_MODES = ("off", "fp16", "bf16")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class Key:
    doc: str
    check: Callable[[Any], Any]  # returns the normalised value or raises ValueError(reason)


def _int(minimum: int) -> Callable[[Any], int]:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"must be an integer >= {minimum}")
        return value
    return check


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def optional(value):
        return None if value is None else check(value)
    return optional


def _number(minimum: float = float("-inf"), strict: bool = False) -> Callable[[Any], float]:
    def check(value):
        if isinstance(value, str):
            # PyYAML reads 1e-3 (no dot) as a string; accept what float() accepts.
            try:
                value = float(value)
            except ValueError:
                raise ValueError("must be a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be a number")
        if value < minimum or (strict and value == minimum):
            raise ValueError(f"must be {'>' if strict else '>='} {minimum:g}")
        return float(value)
    return check


def _bool(value):
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value):
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value
    return check


def _amp(value):
    # YAML 1.1 reads a bare `off` as false.
    return "off" if value is False else _choice(*AMP_MODES)(value)


def _device(value):
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError("must be auto, cpu, cuda or cuda:N")
    return value


def _text(value):
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


SCHEMA: dict[str, Key] = {
    # What is trained (the Table 1 cell)
    "dataset": Key("mnist | cifar10 | nmnist | dvs128_gesture (Table 1), digits (scikit-learn's "
                   "8x8 digits padded to MNIST's 1x28x28, offline), or synthetic (random tensors, "
                   "timing only: accuracy is meaningless)", _choice(*DATASETS)),
    "synthetic_like": Key("with dataset: synthetic, the dataset whose sample shape, class count "
                          "and split sizes the random data copies; null otherwise",
                          _optional(_choice(*REAL_DATASETS))),
    "arch": Key("SpikingJelly model: spiking_resnet18 | spiking_resnet34 | spiking_resnet50",
                _choice(*ARCHS)),
    "batch_size": Key("global batch size (paper: 100; DVS128 Gesture 10); under torchrun each "
                      "of the N processes takes batch_size / N", _int(1)),
    # Training schedule (paper section 5.2)
    "T": Key("time steps per sample (paper: 32); also the number of frames for event data",
             _int(1)),
    "epochs": Key("training epochs, each followed by a full test pass (paper: 5)", _int(1)),
    "lr": Key("Adam learning rate (paper: 1e-3); the loss is cross-entropy on the output "
              "averaged over the T steps", _number(0.0, strict=True)),
    "repeats": Key("independent runs (seeds seed, seed+1, ...) averaged in the report "
                   "(paper: 3)", _int(1)),
    "seed": Key("base random seed: model init, shuffling and Poisson encoding", _int(0)),
    # Neuron (paper section 5.1: k_tau = 0.2 = 1 - 1/tau)
    "tau": Key("LIF membrane time constant (paper: 1.25, i.e. k_tau = 1 - 1/tau = 0.2)",
               _number(1.0, strict=True)),
    "decay_input": Key("LIF decays the input as well as the potential (paper's Eq. 1: false)",
                       _bool),
    "v_threshold": Key("firing threshold V_th (paper: 0.3)", _number()),
    "v_reset": Key("reset potential V_rest (paper: 0); null selects soft reset",
                   _optional(_number())),
    "detach_reset": Key("detach the reset from the graph in the backward (paper: false)", _bool),
    "surrogate_alpha": Key("alpha of the Sigmoid surrogate gradient, paper's Eq. 6 (paper: 4)",
                           _number(0.0, strict=True)),
    # Input encoding
    "static_encoding": Key("static images: poisson (each step fires with probability = pixel "
                           "intensity, drawn on the device; paper) or direct (the analog image "
                           "repeated T times)", _choice("poisson", "direct")),
    "event_split_by": Key("event data: SpikingJelly frames, T per sample, split by number of "
                          "events (paper's SBE: number) or by time", _choice("number", "time")),
    # Data access
    "data_root": Key("folder holding the datasets (torchvision layout for mnist/cifar10, "
                     "<data_root>/NMNIST and <data_root>/DVS128Gesture for SpikingJelly's)", _text),
    "download": Key("let torchvision download MNIST / CIFAR-10 into data_root when missing", _bool),
    "num_workers": Key("DataLoader worker processes (0 loads in the training process)", _int(0)),
    # Execution
    "backend": Key("SpikingJelly neuron backend: torch | cupy (CUDA + CuPy) | temporal_fusion",
                   _choice(*BACKENDS)),
    "device": Key("auto (CUDA if available, else CPU) | cpu | cuda | cuda:N; under torchrun "
                  "each process takes cuda:LOCAL_RANK", _device),
    "dtype": Key("float32 (paper) | float64: weights and inputs in double precision, for exact "
                 "comparisons such as N processes against one (spikes are thresholds, so float32 "
                 "rounding differences flip some and runs drift apart)",
                 _choice("float32", "float64")),
    "amp": Key("autocast: off | fp16 (with a gradient scaler) | bf16", _amp),
    "max_batches": Key("stop each train and test pass after this many batches (smoke and "
                       "timing runs); null runs full epochs", _optional(_int(1))),
    "warmup_batches": Key("untimed forward + backward passes (and one test forward) on a copy "
                          "of the model before the first epoch, so one-off costs such as kernel "
                          "compilation are reported as warmup_seconds, not inside epoch 1; 0 skips",
                          _int(0)),
    "sync_batchnorm": Key("under torchrun, normalise with the statistics of the global batch, "
                          "so N processes train as one process would", _bool),
}

META_KEYS = ("inherit", "name")  # inherit: parent file, relative to this one; name: run name


def describe() -> str:
    """Every key with its documentation, for --describe and error messages."""
    width = max(map(len, SCHEMA))
    lines = [f"  {'inherit':<{width}}  parent config, relative to the file (cells: base.yaml)",
             f"  {'name':<{width}}  run name (default: the file name without .yaml)"]
    lines += [f"  {key:<{width}}  {spec.doc}" for key, spec in SCHEMA.items()]
    return "\n".join(lines)


def _unknown(key: str, where: str) -> ConfigError:
    known = list(SCHEMA) + list(META_KEYS)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6) or [
        k for k in known if key.lower().startswith(k.lower() + "_")]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint} Valid keys: {', '.join(known)} "
                       f"(each documented by: python -m experiments.config --describe)")


def check_value(key: str, value: Any, where: str) -> Any:
    """The normalised value of ``key`` or a ConfigError naming ``where`` it came from."""
    if key not in SCHEMA:
        raise _unknown(key, where)
    try:
        return SCHEMA[key].check(value)
    except ValueError as reason:
        raise ConfigError(f"{where}: {key} {reason}, got {value!r} ({SCHEMA[key].doc})") from None


def _read(path: Path, chain: tuple[Path, ...]) -> dict:
    if path in chain:
        raise ConfigError(f"{path}: inherit loop {' -> '.join(map(str, chain + (path,)))}")
    if not path.is_file():
        where = f" (inherited by {chain[-1]})" if chain else ""
        raise ConfigError(f"config file {path} not found{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of key: value, got {type(data).__name__}")
    merged: dict = {}
    parent = data.pop("inherit", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: inherit must be a file name, got {parent!r}")
        merged = _read((path.parent / parent).resolve(), chain + (path,))
        merged.pop("name", None)  # a name belongs to its own file
    for key, value in data.items():
        if key == "name":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{path}: name must be a non-empty string, got {value!r}")
            merged[key] = value
            continue
        merged[key] = check_value(key, value, str(path))
    return merged


def _finish(config: dict, where: str) -> dict:
    missing = [key for key in SCHEMA if key not in config]
    if missing:
        raise ConfigError(f"{where}: missing keys {', '.join(missing)} (a cell file inherits "
                          f"the rest from base.yaml: add 'inherit: base.yaml')")
    if config["dtype"] == "float64" and config["amp"] != "off":
        raise ConfigError(f"{where}: amp {config['amp']} lowers the precision that dtype float64 "
                          f"asks for; use amp: off with float64")
    if config["backend"] == "cupy" and (config["dtype"] == "float64" or config["amp"] == "bf16"):
        what = "dtype float64" if config["dtype"] == "float64" else "amp bf16"
        raise ConfigError(f"{where}: backend cupy with {what}: SpikingJelly 0.0.0.0.14's cupy LIFNode has "
                          f"kernels for float32 and float16 only and would fail mid-epoch "
                          f"(NotImplementedError on the first batch); use amp off or fp16 with cupy, or "
                          f"backend temporal_fusion / torch for {what}")
    if config["dataset"] == "synthetic" and config["synthetic_like"] is None:
        raise ConfigError(f"{where}: dataset synthetic needs synthetic_like: the dataset whose "
                          f"shape the random data copies, e.g. synthetic_like: cifar10")
    if config["dataset"] != "synthetic" and config["synthetic_like"] is not None:
        raise ConfigError(f"{where}: synthetic_like is only used with dataset: synthetic, "
                          f"got dataset {config['dataset']!r}; set synthetic_like: null")
    ordered = {"name": config["name"]}
    ordered.update((key, config[key]) for key in SCHEMA)
    return ordered


def load(path: str | Path, overrides: Optional[dict] = None) -> dict:
    """The resolved config of ``path`` (inheritance applied) with ``overrides`` on top.

    ``overrides`` maps keys to values; ``dataset: synthetic`` given as an override keeps the
    file's dataset as ``synthetic_like``, so ``--dataset synthetic`` on a CIFAR-10 cell times
    random data of CIFAR-10's shape.
    """
    path = Path(path).resolve()
    config = _read(path, ())
    config.setdefault("name", path.stem)
    overrides = dict(overrides or {})
    if "dataset" in overrides and "synthetic_like" not in overrides:
        if overrides["dataset"] != "synthetic":
            overrides["synthetic_like"] = None
        elif config.get("dataset") != "synthetic":
            overrides["synthetic_like"] = config.get("dataset")
    for key, value in overrides.items():
        config[key] = check_value(key, value, "override")
    return _finish(config, str(path))


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from --set, VALUE read as YAML (so 4 is an int, null is None)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set takes KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def cell_configs(directory: Path = CONFIG_DIR) -> list[Path]:
    """The Table 1 cell files: every YAML directly in ``directory`` except base.yaml."""
    return sorted(p for p in directory.glob("*.yaml") if p.name != "base.yaml")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="*", help="config files to resolve and print")
    parser.add_argument("--describe", action="store_true", help="document every key")
    args = parser.parse_args(argv)
    if args.describe or not args.config:
        print(describe())
    for path in args.config:
        print(f"# {path}\n{yaml.safe_dump(load(path), sort_keys=False)}")


if __name__ == "__main__":
    main()
