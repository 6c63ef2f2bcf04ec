"""The layout of an `abba compare` folder, owned here (grid writes it, table and `abba inspect` read it):

OUT/configs/<method>_seed<k>.yaml   the exact config each run trains with (`abba train` accepts it as is)
OUT/runs/<method>_seed<k>/          an ordinary run directory (+ eval/<task>/ and compare_resources.json)
OUT/compare.md, compare.json, compare.png   the table and the loss curves
"""

from __future__ import annotations

from pathlib import Path

CONFIGS_DIR = "configs"
RUNS_DIR = "runs"
RESOURCES = "compare_resources.json"  # per run: wall time and peak memory of its training
TABLE = "compare.md"
SUMMARY = "compare.json"
CURVES = "compare.png"


def run_name(method: str, seed: int) -> str:
    return f"{method}_seed{seed}"


def run_dir(out: Path, name: str) -> Path:
    return Path(out) / RUNS_DIR / name


def config_path(out: Path, name: str) -> Path:
    return Path(out) / CONFIGS_DIR / f"{name}.yaml"


def compare_runs(out: Path) -> list[Path]:
    """The run directories of a compare folder (finished or not), in name order."""
    return sorted((Path(out) / RUNS_DIR).glob("*_seed*"))
