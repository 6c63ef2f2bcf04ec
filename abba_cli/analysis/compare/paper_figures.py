"""The ABBA paper's own figures, printed beside ours by `abba compare --paper NAME` where the setting is the paper's.

Data, not code: NAME -> the table's title, its source, and {row: {task or "avg": accuracy %}} with rows named as
compare names them (a method, or a method plus its sweep cell: "abba_alpha-16"). Only figures transcribed from a
cited source belong here; a cell the source does not give stays out (the table prints "-").

Transcribed so far: the Llama-3.2-1B commonsense averages of LoRA, DoRA and LoRA-Pro and the two parameter counts
that this project's issue 31 quotes from arXiv 2505.14238 Table 1. The paper's other cells (its per-task
columns, ABBA's own rows, Tables 2-8) were not readable from this offline machine: add them from the paper with
their table number, and the commands in configs/repro/README.md print them beside ours.
"""

from __future__ import annotations

from typing import Any

from abba_cli.errors import UserError

PAPER = "Singhal, Ponkshe, Vartak, Vepakomma: ABBA-Adapters (arXiv 2505.14238, ICLR 2026)"

PAPER_FIGURES: dict[str, dict[str, Any]] = {
    "table1-llama3.2-1b": {
        "title": "Table 1: Llama-3.2-1B trained on Commonsense170K, accuracy (%) on eight commonsense tasks",
        "source": f"{PAPER}, Table 1, as quoted in issue 31 of this project",
        "rows": {
            "lora": {"avg": 71.49},
            "dora": {"avg": 72.36},
            "lora_pro": {"avg": 72.28},
        },
        "trainable_params": {"lora": 22.54e6, "dora": 22.92e6},
    },
}


def paper_table(name: str) -> dict[str, Any]:
    """The figures of one of the paper's tables; UserError naming the valid names."""
    if name not in PAPER_FIGURES:
        raise UserError(
            f"--paper {name!r}: no such table of the paper's figures; valid: {', '.join(PAPER_FIGURES)}"
        )
    return PAPER_FIGURES[name]


def paper_cell(table: dict[str, Any] | None, row: str, column: str) -> float | None:
    if table is None:
        return None
    return table["rows"].get(row, {}).get(column)
