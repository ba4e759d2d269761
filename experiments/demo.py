"""README demo: train Spiking-ResNet18 on scikit-learn's digits (offline) with the
temporal_fusion and torch backends and print the Table-1-style comparison.

    python experiments/demo.py            # CUDA when available, else CPU; runs/demo/table1.md

Extra arguments go to table1.py, e.g. ``--device cpu`` or ``--epochs 1``. On a 2-core CPU the
whole demo (two backends, 2 epochs at T=4) takes 1-3 minutes (longer when other jobs share the cores).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: import as a package
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from experiments import table1
from experiments.config import CONFIG_DIR

CONFIG = CONFIG_DIR / "demo" / "digits_resnet18.yaml"


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return table1.main(["--configs", str(CONFIG), "--backends", "temporal_fusion", "torch",
                        "--out", "runs/demo"] + argv)


if __name__ == "__main__":
    sys.exit(main())
