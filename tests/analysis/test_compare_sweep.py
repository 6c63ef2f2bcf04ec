"""`abba compare --sweep`: parsing, the grid, the budget rule (kept unless a rank is swept), the paper-style
table with the paper's figures beside ours, and a real two-cell sweep on the tiny model that resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_compare import SUM_M_N, _cli, _raw, _write

from abba_cli.analysis.compare import grid as runner
from abba_cli.analysis.compare.budget import plan_methods
from abba_cli.analysis.compare.paper_figures import PAPER_FIGURES, paper_table
from abba_cli.analysis.compare.sweep import apply_cell, cells, parse_sweep, parse_sweeps
from abba_cli.analysis.compare.table import paper_layout
from abba_cli.errors import UserError


def test_values_split_outside_brackets_and_parse_as_yaml():
    s = parse_sweep("adapter.ranks=[8,24], [16,16],[24, 8]")
    assert s.key == "adapter.ranks" and s.values == ([8, 24], [16, 16], [24, 8])
    assert parse_sweep("adapter.alpha=4,8,16").values == (4, 8, 16)
    assert parse_sweep("adapter.target_modules=[q_proj,v_proj],[q_proj]").values == (
        ["q_proj", "v_proj"],
        ["q_proj"],
    )
    for bad, words in [
        ("alpha=4,8", "SECTION.KEY"),
        ("adapter.alpha=4,,8", "empty value"),
        ("adapter.alpha=4,4", "listed twice"),
    ]:
        with pytest.raises(UserError, match=words):
            parse_sweep(bad)
    with pytest.raises(UserError, match="swept twice"):
        parse_sweeps(["adapter.alpha=1,2", "adapter.alpha=3"])


def test_grid_is_the_product_first_sweep_slowest_with_safe_names():
    grid = cells(parse_sweeps(["adapter.alpha=4,16", "adapter.ranks=[2,3],[4,1]"]))
    assert [c.label for c in grid] == [
        "alpha=4 ranks=[2,3]",
        "alpha=4 ranks=[4,1]",
        "alpha=16 ranks=[2,3]",
        "alpha=16 ranks=[4,1]",
    ]
    assert grid[1].slug == "alpha-4_ranks-4-1"
    assert cells([])[0].slug == "" and len(cells([])) == 1
    # setting one form of ABBA's ranks drops the other
    raw = {"adapter": {"type": "abba", "r1": 2, "r2": 3}}
    assert apply_cell(raw, grid[0])["adapter"] == {"type": "abba", "ranks": [2, 3], "alpha": 4}
    assert raw["adapter"] == {"type": "abba", "r1": 2, "r2": 3}  # the input is not modified


def test_budget_is_kept_unless_a_rank_is_swept(tmp_path, tiny_model_dir):
    raw = _raw(tiny_model_dir, tmp_path)  # abba r1 = 2, r2 = 3 on q_proj, v_proj
    plans = plan_methods(raw, "cmp.yaml", ["abba", "lora"], {}, parse_sweeps(["adapter.alpha=4,8"]))
    assert [p.row for p in plans] == ["abba_alpha-4", "abba_alpha-8", "lora_alpha-4", "lora_alpha-8"]
    assert {p.trainable for p in plans} == {5 * SUM_M_N}
    assert plans[1].cfg.adapter.alpha == 8.0 and plans[3].cfg.adapter.alpha == 8.0
    ranks = plan_methods(raw, "cmp.yaml", ["abba"], {}, parse_sweeps(["adapter.ranks=[2,3],[4,4],[2,2,2]"]))
    assert [p.trainable for p in ranks] == [5 * SUM_M_N, 8 * SUM_M_N, 6 * SUM_M_N]  # sum r (m + n), by hand
    assert ranks[2].cfg.adapter.ranks == [2, 2, 2] and ranks[1].cfg.adapter.r1 == 4
    with pytest.raises(UserError, match="the budget is"):  # a rank changed another way is still refused
        plan_methods(raw, "cmp.yaml", ["abba"], {"abba": ["adapter.r1=4"]}, parse_sweeps(["adapter.alpha=4"]))
    with pytest.raises(UserError, match=r"\(abba init=pissa\).*lora only"):
        plan_methods(raw, "cmp.yaml", ["abba"], {}, parse_sweeps(["adapter.init=svd,pissa"]))


def _summary(rows: dict[str, list[float]]) -> dict:
    tasks = ["boolq", "piqa"]
    methods = {
        row: {
            "label": row,
            "trainable_params": 1_000_000,
            "accuracy": {"per_task": {t: {"accuracy": a} for t, a in zip(tasks, accs, strict=True)}},
        }
        for row, accs in rows.items()
    }
    return {"tasks": tasks, "methods": methods}


def test_paper_layout_rows_tasks_average_and_the_papers_figures():
    lines = paper_layout(
        _summary({"lora": [0.5, 0.75], "abba": [0.25, 1.0]}), paper_table("table1-llama3.2-1b")
    )
    assert lines[0] == "| method | params | boolq | piqa | Avg |"
    assert lines[2] == "| lora | 1.000M (paper 22.54M) | 50.0 | 75.0 | 62.5 (paper 71.49) |"
    assert lines[3] == "| abba | 1.000M | 25.0 | 100.0 | 62.5 |"  # no figure for this row: ours only
    assert "arXiv 2505.14238" in lines[-1]
    assert PAPER_FIGURES["table1-llama3.2-1b"]["rows"]["dora"]["avg"] == 72.36
    with pytest.raises(UserError, match="valid: table1-llama3.2-1b"):
        paper_table("table9")


def test_a_two_cell_sweep_runs_tabulates_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
    raw = _raw(tiny_model_dir, tmp_path, max_steps=2)
    cfg = _write(tmp_path, raw)
    out = tmp_path / "sweep"
    args = [
        str(cfg),
        "--methods",
        "abba",
        "--seeds",
        "1",
        "--sweep",
        "adapter.init=svd,random",
        "--out",
        str(out),
    ]
    result = _cli(*args, "--paper", "table1-llama3.2-1b")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "abba_init-random_seed1",
        "abba_init-svd_seed1",
    ]
    saved = yaml.safe_load((out / "runs" / "abba_init-random_seed1" / "config.yaml").read_text())
    assert saved["adapter"]["init"] == "random"
    md = (out / "compare.md").read_text()
    assert "| method | params | boolq | Avg |" in md and "| abba init=svd | 0.002M |" in md
    table = json.loads((out / "compare.json").read_text())
    assert list(table["methods"]) == ["abba_init-svd", "abba_init-random"]
    assert table["paper"]["name"] == "table1-llama3.2-1b"
    calls = []
    monkeypatch.setattr(runner, "_train", lambda c, p, resume: calls.append(Path(c.output_dir).name))
    assert _cli(*args).exit_code == 0 and calls == []  # rerun: both cells kept
    result = _cli(*args[:-2], "--out", str(tmp_path / "o2"), "--paper", "nope")
    assert result.exit_code == 2 and "valid: table1-llama3.2-1b" in result.output
