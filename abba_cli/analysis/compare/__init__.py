"""`abba compare`: ABBA, LoRA, HiRA (and rsLoRA, PiSSA, full fine-tuning) at one trainable-parameter budget,
on the user's own config: budget.py derives the adapter blocks, grid.py trains and evaluates every
(method, seed), table.py writes the table and the curves."""

from abba_cli.analysis.compare.grid import run_compare

__all__ = ["run_compare"]
