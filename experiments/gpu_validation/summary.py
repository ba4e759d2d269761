"""summary.md of a ./dev gpu run: the stage table, then a digest of each benchmark's and ncu's files."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

from .stage import Stage


def summary_markdown(meta: dict, stages: list[Stage], out: Path) -> str:
    lines = [f"# GPU validation: {meta['device_name']}", "",
             f"- date (UTC) {meta['date_utc']}, commit {meta['commit'] or 'unknown'}"
             + (" (dirty)" if meta.get("dirty") else ""),
             f"- {'CPU smoke run (small sizes)' if meta['smoke'] else 'full run'}, total {meta['seconds']:.0f} s",
             "", "| stage | status | seconds / budget | note |", "|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} / {s.budget_s:.0f} | {s.reason.replace('|', '/')} |")
    lines += [""] + _lif_digest(out, meta) + _memory_digest(out, meta) + _net_digest(out, meta) + _ncu_digest(out)
    return "\n".join(lines) + "\n"


def _load(out: Path, name: str) -> Optional[dict]:
    path = out / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _lif_digest(out: Path, meta: dict) -> list[str]:
    data = _load(out, f"lif-{meta['device']}.json")
    if not data:
        return []
    rows = [r for r in data["results"] if r["status"] == "ok"]
    lines = [f"## bench lif (N = {data['config']['neurons']:,}; copy bandwidth "
             f"{data['copy_bandwidth']['gb_per_s']:.0f} GB/s){'' if data.get('complete', True) else ' - INCOMPLETE'}", "",
             "Median ms per layer call; x = time / temporal fusion's; 'of copy' = temporal fusion's design "
             "bytes / time as a fraction of the copy bandwidth.", "",
             "| mode | dtype | T | temporal_fusion | of copy | torch | cupy | serial |", "|---|---|---|---|---|---|---|---|"]
    by = {(r["mode"], r["dtype"], r["T"], r["method"]): r for r in rows}
    for mode, dtype, T in sorted({(r["mode"], r["dtype"], r["T"]) for r in rows}, key=lambda k: (k[0], k[1], k[2])):
        tf = by.get((mode, dtype, T, "temporal_fusion"))
        cells = [mode, dtype, str(T), f"{tf['median_ms']:.3f}" if tf else "-",
                 f"{tf['fraction_of_copy_bw']:.2f}" if tf else "-"]
        for m in ("torch", "cupy", "serial"):
            r = by.get((mode, dtype, T, m))
            cells.append(f"{r['median_ms']:.3f} ({r['speedup_of_temporal_fusion']:.1f}x)"
                         if r and r.get("speedup_of_temporal_fusion") else (f"{r['median_ms']:.3f}" if r else "-"))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [r for r in data["results"] if r["status"] not in ("ok", "skipped")]
    if errors:
        lines += ["", f"{len(errors)} cases failed: " + "; ".join(
            f"{r['method']} {r['mode']} {r['dtype']} T={r['T']}: {r.get('reason', '')}" for r in errors[:5])]
    return lines + [""]


def _memory_digest(out: Path, meta: dict) -> list[str]:
    data = _load(out, f"memory-{meta['device']}.json")
    if not data:
        return []
    lines = ["## bench memory (peak MiB of one training step)", "", "| model | method | dtype | peak MiB | note |",
             "|---|---|---|---|---|"]
    for r in data["results"]:
        peak = f"{r['peak_mib']:.1f}" if r.get("peak_mib") is not None else "-"
        lines.append(f"| {r['model']} | {r['method']} | {r['dtype']} | {peak} | {r['status']} {r.get('reason') or ''} |")
    return lines + [""]


def _net_digest(out: Path, meta: dict) -> list[str]:
    data = _load(out, f"net-{meta['device']}.json")
    if not data:
        return []
    lines = [f"## Whole-network step ({data.get('benchmark', 'net')})", "",
             "| model | method | mode | median ms | peak MiB | status |", "|---|---|---|---|---|---|"]
    for r in data.get("results", []):
        ms = f"{r['median_ms']:.2f}" if r.get("median_ms") is not None else "-"
        peak = f"{r['peak_mib']:.1f}" if r.get("peak_mib") is not None else "-"
        lines.append(f"| {r.get('model')} | {r.get('method')} | {r.get('mode')} | {ms} | {peak} | "
                     f"{r.get('status')} {r.get('reason') or ''} |")
    return lines + [""]


def _ncu_digest(out: Path) -> list[str]:
    path = out / "ncu.csv"
    if not path.exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    lines = ["## ncu (per kernel launch)", "", "| kernel | metric | value |", "|---|---|---|"]
    lines += [f"| `{r['kernel'][:60]}` | {r['metric']} | {r['value']} {r['unit']} |" for r in rows]
    return lines + [""]
