"""Table 1 from a folder of runs: table1.md and table1.csv in the paper's layout (architecture x
method rows, dataset x {Acc., T_train, T_test} columns), speedups of temporal_fusion against each
SpikingJelly backend, the paper's published numbers beside ours, and a bar chart."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

PAPER = Path(__file__).resolve().parent / "paper_table1.yaml"
METHODS = {"torch": "SpikingJelly (torch)", "cupy": "SpikingJelly (cupy)",
           "temporal_fusion": "Ours (temporal_fusion)"}
ARCH_LABELS = {"spiking_resnet18": "Spiking-ResNet18", "spiking_resnet34": "Spiking-ResNet34",
               "spiking_resnet50": "Spiking-ResNet50"}
DATA_ORDER = ("mnist", "cifar10", "digits", "nmnist", "dvs128_gesture")
BLOCKS = (("static", "Static image datasets"), ("event", "Event-based datasets"))
OURS = "temporal_fusion"
BASELINES = ("torch", "cupy")
SETTINGS = ("T", "epochs", "repeats", "batch_size", "max_batches", "amp", "static_encoding")


@dataclass(frozen=True)
class Column:
    """A dataset column: the data's name plus whether it was synthetic data of that shape."""
    data: str
    label: str
    kind: str
    synthetic: bool

    @property
    def key(self) -> str:
        return self.data + ("_synthetic" if self.synthetic else "")

    @property
    def title(self) -> str:
        return self.label + (" (synthetic)" if self.synthetic else "")


@dataclass
class Table:
    runs: dict = field(default_factory=dict)     # (arch, column key, backend) -> metrics
    columns: dict = field(default_factory=dict)  # column key -> Column
    archs: list = field(default_factory=list)
    backends: list = field(default_factory=list)
    paper: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def get(self, arch: str, column: Column, backend: str) -> Optional[dict]:
        return self.runs.get((arch, column.key, backend))

    def paper_value(self, arch: str, column: Column, backend: str, key: str) -> Optional[float]:
        return self.paper.get(arch, {}).get(column.data, {}).get(backend, {}).get(key)

    def speedup(self, arch: str, column: Column, baseline: str, phase: str,
                paper: bool = False) -> Optional[float]:
        """T_phase(baseline) / T_phase(temporal_fusion): how many times faster ours is."""
        key = f"{phase}_seconds"
        if paper:
            base, ours = (self.paper_value(arch, column, b, key) for b in (baseline, OURS))
        else:
            runs = self.get(arch, column, baseline), self.get(arch, column, OURS)
            base, ours = (r["summary"][key] if r else None for r in runs)
        return base / ours if base and ours else None

    def ordered_columns(self, kind: Optional[str] = None) -> list[Column]:
        order = {name: i for i, name in enumerate(DATA_ORDER)}
        cols = [c for c in self.columns.values() if kind is None or c.kind == kind]
        return sorted(cols, key=lambda c: (order.get(c.data, len(order)), c.synthetic))


def load_runs(folder: Path) -> list[dict]:
    """Every metrics.json under ``folder``, each with its path under key 'path'."""
    runs = []
    for path in sorted(Path(folder).rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        metrics["path"] = str(path.parent)
        runs.append(metrics)
    return runs


def load_paper(path: Path = PAPER) -> dict:
    return yaml.safe_load(Path(path).read_text())["results"]


def build(runs: list[dict], paper: Optional[dict] = None) -> Table:
    """Arrange runs by (architecture, dataset column, backend); two runs in one place is an error."""
    if not runs:
        raise ValueError("no runs to tabulate: no metrics.json found")
    table = Table(paper=load_paper() if paper is None else paper)
    for run in runs:
        column = Column(run["data"]["name"], run["data"]["label"], run["data"]["kind"], run["synthetic"])
        key = (run["arch"], column.key, run["backend"])
        if key in table.runs:
            raise ValueError(f"two runs of {' / '.join(key)}: {table.runs[key]['path']} and "
                             f"{run['path']}; tabulate one folder per table")
        table.runs[key] = run
        table.columns[column.key] = column
    table.archs = [a for a in ARCH_LABELS if any(k[0] == a for k in table.runs)]
    table.backends = [b for b in METHODS if any(k[2] == b for k in table.runs)]
    for setting in SETTINGS:
        values = sorted({_setting(r["config"][setting]) for r in runs})
        if len(values) > 1:
            table.notes.append(f"runs differ in {setting} ({', '.join(values)}): compare within "
                               f"equal settings only")
    if any(r["config"]["max_batches"] is not None for r in runs):
        table.notes.append("max_batches cut the epochs short: times are for the batches run, not "
                           "for full epochs, so they are not comparable to the paper's")
    if any(r["synthetic"] for r in runs):
        table.notes.append("synthetic columns: random inputs and labels; their accuracy is chance "
                           "by construction and is not shown, their times are real")
    if "cupy" in table.backends:
        table.notes.append("SpikingJelly (cupy) T_test: its LIF nodes are timed in train mode under "
                           "no_grad (BatchNorm in eval mode), because SpikingJelly 0.0.0.0.14's eval mode "
                           "runs its TorchScript loop whatever the backend (experiments/train.py "
                           "_test_mode); SpikingJelly (torch) T_test is that TorchScript eval loop")
    return table


def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def _accuracy(run: Optional[dict]) -> str:
    if run is None:
        return "—"
    if not run["accuracy_meaningful"]:
        return "n/a"
    s = run["summary"]
    spread = f" ± {s['best_accuracy_std']:.2f}" if s["repeats"] > 1 else ""
    return f"{s['best_accuracy']:.2f}{spread}"


def _with_paper(ours: str, paper: Optional[float], fmt: str = "{:.2f}") -> str:
    return ours if paper is None else f"{ours} [{fmt.format(paper)}]"


def _times(table: Table, arch: str, column: Column) -> dict:
    return {b: table.get(arch, column, b)["summary"] for b in table.backends if table.get(arch, column, b)}


def _setting(value) -> str:
    return "null" if value is None else str(value)


def _header(runs: list[dict]) -> list[str]:
    envs = [r["environment"] for r in runs]
    devices = sorted({f"{e['device']['name']} ({e['device']['type']}, {e['device']['world_size']} "
                      f"process{'es' if e['device']['world_size'] > 1 else ''})" for e in envs})
    v = envs[0]["versions"]
    commits = sorted({(e["git"]["commit"] or "unknown")[:10] + (" (dirty)" if e["git"]["dirty"] else "")
                      for e in envs})
    settings = ", ".join(f"{s}={'/'.join(sorted({_setting(r['config'][s]) for r in runs}))}"
                         for s in SETTINGS)
    return [f"Device: {'; '.join(devices)}",
            f"Versions: torch {v['torch']}, SpikingJelly {v['spikingjelly']}, sj-temporal-fusion "
            f"{v['sj_temporal_fusion']}, CuPy {v['cupy'] or 'absent'}, CUDA {v['cuda'] or 'n/a'}; "
            f"commit {', '.join(commits)}",
            f"Settings: {settings}"]


def markdown(table: Table) -> str:
    runs = list(table.runs.values())
    lines = ["# Table 1 reproduction: Spiking-ResNets on SpikingJelly neuron backends", ""]
    lines += [f"- {line}" for line in _header(runs)]
    lines += ["", "Acc.: best test accuracy in % (mean ± std over repeats). T_train, T_test: "
              "seconds per epoch, mean ± std over epochs and repeats, of device-synchronised compute "
              "(Poisson encoding on the device, forward, backward, step); data loading is listed "
              "separately below. [Brackets]: the paper's Table 1 (NVIDIA A100, 5 epochs x 3 runs, "
              "times including data loading and CPU-side Poisson encoding). Bold: fastest here.", ""]
    for kind, title in BLOCKS:
        columns = table.ordered_columns(kind)
        if not columns:
            continue
        lines += [f"## {title}", ""]
        head = ["Architecture", "Method"]
        for c in columns:
            head += [f"{c.title} Acc.", "T_train", "T_test"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arch in table.archs:
            for backend in table.backends:
                row = [ARCH_LABELS[arch], METHODS[backend]]
                for c in columns:
                    run, times = table.get(arch, c, backend), _times(table, arch, c)
                    acc = _accuracy(run)
                    if run is None or run["accuracy_meaningful"]:
                        acc = _with_paper(acc, table.paper_value(arch, c, backend, "accuracy"))
                    row.append(acc)
                    for phase in ("train", "test"):
                        value = run["summary"][f"{phase}_seconds"] if run else None
                        text = _seconds(value)
                        if value is not None and len(times) > 1 and \
                                value == min(t[f"{phase}_seconds"] for t in times.values()):
                            text = f"**{text}**"
                        if run and run["summary"].get(f"{phase}_seconds_std"):
                            text += f" ± {_seconds(run['summary'][f'{phase}_seconds_std'])}"
                        row.append(_with_paper(text, table.paper_value(arch, c, backend, f"{phase}_seconds")))
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += _seeds_section(table)
    lines += _speedup_section(table)
    lines += _throughput_section(table)
    if table.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in table.notes] + [""]
    return "\n".join(lines)


def _seeds_section(table: Table) -> list[str]:
    """Every seed's best accuracy: two backends are alike when their means differ by less than
    the seed-to-seed spread, which one run each cannot show."""
    head = ["Architecture", "Dataset", "Method", "seeds", "best accuracy per seed", "mean ± std",
            "min - max"]
    rows = []
    for arch in table.archs:
        for c in table.ordered_columns():
            for backend in table.backends:
                run = table.get(arch, c, backend)
                if run is None or not run["accuracy_meaningful"]:
                    continue
                acc = [r["best_accuracy"] for r in run["repeats"]]
                s = run["summary"]
                spread = f" ± {s['best_accuracy_std']:.2f}" if len(acc) > 1 else " (one seed: no spread)"
                rows.append("| " + " | ".join([
                    ARCH_LABELS[arch], c.title, METHODS[backend],
                    ", ".join(str(r["seed"]) for r in run["repeats"]), ", ".join(f"{a:.2f}" for a in acc),
                    f"{s['best_accuracy']:.2f}{spread}", f"{min(acc):.2f} - {max(acc):.2f}"]) + " |")
    if not rows:
        return []
    lines = ["## Accuracy over seeds", "",
             "Each seed fixes the initial weights (the same for every backend), the data order and "
             "the Poisson spikes. The backends agree to rounding at the first step; from there Adam "
             "turns rounding differences into different trajectories, so compare a backend's mean "
             "with the others' against the seed-to-seed spread, not single runs.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + rows
    if any(len(run["repeats"]) < 3 for run in table.runs.values() if run["accuracy_meaningful"]):
        table.notes.append("fewer than 3 seeds in some cells: their accuracy differences cannot be "
                           "told apart from seed-to-seed variation")
    return lines + [""]


def _speedup_section(table: Table) -> list[str]:
    baselines = [b for b in BASELINES if b in table.backends]
    if OURS not in table.backends or not baselines:
        return []
    head = ["Architecture", "Dataset"] + [f"{phase} vs {b}" for phase in ("T_train", "T_test")
                                          for b in baselines]
    lines = ["## Speedup of temporal_fusion", "",
             "T(SpikingJelly backend) / T(temporal_fusion); [brackets]: the same ratio from the "
             "paper's numbers.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch in table.archs:
        for c in table.ordered_columns():
            if table.get(arch, c, OURS) is None:
                continue
            row = [ARCH_LABELS[arch], c.title]
            for phase in ("train", "test"):
                for b in baselines:
                    ours = table.speedup(arch, c, b, phase)
                    paper = table.speedup(arch, c, b, phase, paper=True)
                    row.append(_with_paper("—" if ours is None else f"{ours:.2f}x", paper, "{:.2f}x"))
            lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _throughput_section(table: Table) -> list[str]:
    head = ["Architecture", "Dataset", "Method", "train data s/epoch", "test data s/epoch",
            "train samples/s", "test samples/s", "warm-up s", "peak memory MiB", "memory measured as", "run"]
    lines = ["## Data loading, throughput and memory", "",
             "Data: seconds per epoch spent waiting for the DataLoader and copying to the device. "
             "Samples/s: over compute time. Warm-up: the untimed first steps (kernel compilation, "
             "library loading), once per run. Peak memory: the CUDA allocator's peak of live tensor "
             "bytes; on the CPU the process's peak resident set, which also holds the Python "
             "runtime, the libraries, the dataset and pages glibc keeps after a free, so it is not "
             "the tensor memory of a step: `python -m sj_temporal_fusion.bench net` measures that "
             "(allocation events) for each backend side by side.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch in table.archs:
        for c in table.ordered_columns():
            for backend in table.backends:
                run = table.get(arch, c, backend)
                if run is None:
                    continue
                s = run["summary"]
                lines.append("| " + " | ".join([
                    ARCH_LABELS[arch], c.title, METHODS[backend], _seconds(s["train_data_seconds"]),
                    _seconds(s["test_data_seconds"]), f"{s['train_samples_per_s']:.1f}",
                    f"{s['test_samples_per_s']:.1f}", _seconds(run["warmup_seconds"]),
                    f"{s['peak_memory_bytes'] / 2**20:.0f}", _memory_kind(s.get("peak_memory_kind")),
                    f"`{run['path']}`"]) + " |")
    return lines + [""]


def _memory_kind(kind: Optional[str]) -> str:
    if not kind:
        return "—"
    if "cuda" in kind:
        return "CUDA allocator peak"
    if "resident" in kind or "rss" in kind.lower():
        return "process peak RSS"
    return kind


CSV_FIELDS = ("accuracy", "accuracy_std", "accuracy_min", "accuracy_max", "seeds", "peak_memory_mib", "train_seconds", "train_seconds_std", "test_seconds",
              "test_seconds_std", "train_data_seconds",
              "test_data_seconds", "train_speedup_of_ours", "test_speedup_of_ours",
              "paper_accuracy", "paper_train_seconds", "paper_test_seconds")


def csv_rows(table: Table) -> list[dict]:
    """One row per (architecture, method), columns <dataset>_<field>. *_speedup_of_ours:
    T(this method) / T(temporal_fusion), 1 on the temporal_fusion row."""
    rows = []
    for arch in table.archs:
        for backend in table.backends:
            row = {"architecture": ARCH_LABELS[arch], "method": METHODS[backend], "backend": backend}
            for c in table.ordered_columns():
                run = table.get(arch, c, backend)
                s = run["summary"] if run else {}
                meaningful = bool(run and run["accuracy_meaningful"])
                values = {
                    "accuracy": s.get("best_accuracy") if meaningful else None,
                    "accuracy_std": s.get("best_accuracy_std") if meaningful else None,
                    "accuracy_min": min(r["best_accuracy"] for r in run["repeats"]) if meaningful else None,
                    "accuracy_max": max(r["best_accuracy"] for r in run["repeats"]) if meaningful else None,
                    "seeds": len(run["repeats"]) if run else None,
                    "peak_memory_mib": s["peak_memory_bytes"] / 2**20 if run else None,
                    "train_seconds": s.get("train_seconds"), "test_seconds": s.get("test_seconds"),
                    "train_seconds_std": s.get("train_seconds_std"),
                    "test_seconds_std": s.get("test_seconds_std"),
                    "train_data_seconds": s.get("train_data_seconds"),
                    "test_data_seconds": s.get("test_data_seconds"),
                    **{f"{phase}_speedup_of_ours": 1.0 if backend == OURS and run
                       else table.speedup(arch, c, backend, phase) for phase in ("train", "test")},
                    "paper_accuracy": table.paper_value(arch, c, backend, "accuracy"),
                    "paper_train_seconds": table.paper_value(arch, c, backend, "train_seconds"),
                    "paper_test_seconds": table.paper_value(arch, c, backend, "test_seconds"),
                }
                row.update({f"{c.key}_{k}": values[k] for k in CSV_FIELDS})
            rows.append(row)
    return rows


def write_csv(table: Table, path: Path) -> None:
    rows = csv_rows(table)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})


def plot(table: Table, path: Path) -> None:
    """Grouped bars: seconds per epoch for each (architecture, dataset), one bar per backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(a, c) for a in table.archs for c in table.ordered_columns()
              if any(table.get(a, c, b) for b in table.backends)]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.4 * len(groups) + 2), 4.2))
    width = 0.8 / len(table.backends)
    for ax, phase in zip(axes, ("train", "test")):
        for i, backend in enumerate(table.backends):
            heights = [(table.get(a, c, backend) or {}).get("summary", {}).get(f"{phase}_seconds", 0.0)
                       for a, c in groups]
            ax.bar([g + (i - (len(table.backends) - 1) / 2) * width for g in range(len(groups))],
                   heights, width, label=METHODS[backend])
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{ARCH_LABELS[a].replace('Spiking-', '')}\n{c.title}" for a, c in groups],
                           fontsize=8)
        ax.set_ylabel("seconds per epoch (compute)")
        ax.set_title(f"T_{phase}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    devices = sorted({r["environment"]["device"]["name"] for r in table.runs.values()})
    fig.text(0.5, 0.005, "; ".join(devices), ha="center", va="bottom", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(table: Table, folder: Path) -> dict:
    """table1.md, table1.csv and table1.png in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"md": folder / "table1.md", "csv": folder / "table1.csv", "png": folder / "table1.png"}
    paths["md"].write_text(markdown(table))
    write_csv(table, paths["csv"])
    plot(table, paths["png"])
    return paths
