"""configs/repro: every paper table's config validates, and every command in configs/repro/README.md (the
paper-scale one in each config's header, and the CPU-scale ones) expands to the table's rows, each of them a valid
run config. No model is loaded: the budget count is compare's own test's business."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from abba_cli.analysis.compare.budget import METHODS, method_block, parse_methods
from abba_cli.analysis.compare.paper_figures import paper_table
from abba_cli.analysis.compare.sweep import apply_cell, cells, parse_sweeps
from abba_cli.config import apply_overrides, load_config, validate_config
from abba_cli.util.yaml_file import read_yaml

ROOT = Path(__file__).resolve().parents[2]
REPRO = ROOT / "configs" / "repro"
README = (REPRO / "README.md").read_text()
# The rows each table of the paper has (methods x settings), as the commands must produce them.
PAPER_ROWS = {
    "table1_commonsense.yaml": 8,  # full FT, LoRA, rsLoRA, PiSSA, DoRA, LoRA-Pro, HiRA, ABBA
    "table2_arithmetic.yaml": 8,
    "table3_init.yaml": 6,  # the six initialisations
    "table4_alpha.yaml": 6,
    "table5_split.yaml": 7,
    "table6_chain.yaml": 4,  # two pairs, four pairs, each at two alphas (equal s needs its own alpha per K)
    "table7_alpha_commonsense.yaml": 6,
    "table8_rank.yaml": 4,
    "figure3_placement.yaml": 4,
}
# Methods that arrive with their adapters (the DoRA/LoRA-Pro work); until then their rows are counted, not built.
PENDING_METHODS = {"dora", "lora_pro"}


def _options(command: str) -> tuple[Path, dict[str, list[str]]]:
    words = shlex.split(command)
    assert words[:2] == ["abba", "compare"], command
    opts: dict[str, list[str]] = {}
    for flag, value in zip(words[3::2], words[4::2], strict=True):
        opts.setdefault(flag, []).append(value)
    return ROOT / words[2], opts


def _rows(command: str) -> list[str]:
    """Every row the command trains (method and sweep cell), each checked to be a valid run config."""
    config, opts = _options(command)
    raw = apply_overrides(read_yaml(config), opts.get("--set", []))
    cfg = validate_config(raw, str(config))
    methods = opts["--methods"][0].split(",")
    assert set(methods) - set(METHODS) <= PENDING_METHODS, methods
    parse_methods(",".join(m for m in methods if m in METHODS))
    grid = cells(parse_sweeps(opts.get("--sweep", [])))
    rows = []
    for method in methods:
        for cell in grid:
            rows.append(f"{method} {cell.label}".strip())
            if method in PENDING_METHODS:
                continue
            row_raw = apply_cell({**raw, "adapter": method_block(method, cfg)}, cell)
            validate_config(row_raw, f"{command} ({rows[-1]})")
    if "--paper" in opts:
        paper_table(opts["--paper"][0])
    return rows


@pytest.mark.parametrize("name", sorted(PAPER_ROWS))
def test_each_table_config_validates_and_its_command_gives_the_tables_rows(name):
    path = REPRO / name
    load_config(path)
    command = next(line for line in path.read_text().splitlines() if line.startswith("# command: "))
    command = command.removeprefix("# command: ")
    assert command in README, f"{name}: configs/repro/README.md must list its command"
    config, _ = _options(command)
    assert config == path
    rows = _rows(command)
    assert len(rows) == PAPER_ROWS[name] and len(set(rows)) == len(rows), rows


def test_every_cpu_command_in_the_readme_expands_to_valid_rows():
    commands = [
        line for line in README.splitlines() if line.startswith("abba compare configs/repro/compare_")
    ]
    assert len(commands) == len(PAPER_ROWS) - 1  # every table but Table 2
    for command in commands:
        assert len(_rows(command)) >= 2, command


def test_the_table_configs_are_all_listed():
    on_disk = {p.name for p in REPRO.glob("table*.yaml")} | {p.name for p in REPRO.glob("figure*.yaml")}
    assert on_disk == set(PAPER_ROWS)
