"""One compact table per paper table run at a CPU's scale (experiments/repro_tables_cpu.sh): each row's
trainable parameters, final validation loss per seed, pooled commonsense accuracy and unparseable answers, read
from the compare.json that `abba compare` wrote in runs/cpu/<table>/."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TABLES = ("table1", "table3", "table4", "table5", "table6", "table8", "figure3")


def table_markdown(compare_json: Path) -> str:
    data = json.loads(compare_json.read_text())
    lines = [
        f"**{compare_json.parent.name}** (`{compare_json.parent}`)",
        "",
        "| row | adapter | trainable | final val_loss (seeds) | mean | accuracy pooled [95% CI] | invalid |",
        "|---|---|---:|---|---:|---|---:|",
    ]
    for label, row in data["methods"].items():
        val = row["final_val_loss"]
        acc = row["accuracy"]["pooled"]
        seeds = ", ".join(f"{v:.3f}" for v in val["values"])
        low, high = (100 * x for x in acc["ci95"])
        lines.append(
            f"| {label} | {row['adapter']} | {row['trainable_params']:,} | {seeds} | {val['mean']:.3f} | "
            f"{100 * acc['accuracy']:.1f}% [{low:.1f}, {high:.1f}] (n={acc['n']}) | {acc['invalid']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("runs/cpu"))
    args = parser.parse_args()
    for name in TABLES:
        path = args.root / name / "compare.json"
        if path.exists():
            print(table_markdown(path), end="\n\n")


if __name__ == "__main__":
    main()
