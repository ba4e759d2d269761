"""Reproduction of the paper's Table 1: configs -> train.py (one cell) -> table1.py (the table).

Run the scripts from the repository root: ``python experiments/train.py ...``,
``python experiments/table1.py ...``, ``python experiments/demo.py``.
"""
