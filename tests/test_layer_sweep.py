"""The layer sweep's bookkeeping (benchmarks/layer_sweep.py): every path is measured, `auto`'s regret and the
cost-model fit are computed right. Timings themselves are never asserted (benchmarks are not tests)."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from abba_cli.adapters import abba


def _load() -> ModuleType:
    # benchmarks/ is a folder of scripts, not a package: import the file directly.
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "layer_sweep.py"
    spec = importlib.util.spec_from_file_location("bench_layer_sweep", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


sweep = _load()


def _synthetic_cells(kr_cost: float, build_cost: float) -> list[dict]:
    """Cells whose 'measured' times are exactly what the cost model says with the given constants."""
    cells = []
    shapes = [(576, 576), (1536, 576), (2048, 2048), (4096, 4096), (14336, 4096)]
    for (m, n), r, t, dropout in itertools.product(shapes, (8, 32, 128), (256, 2048, 8192), (False, True)):
        costs = dict(zip(sweep.COST_NAMES, (kr_cost, build_cost), strict=True))
        old = sweep.current_costs()
        try:
            for k, v in costs.items():
                setattr(abba, k, v)
            modelled = abba.path_costs(m, n, r // 2, r // 2, t, dropout)
        finally:
            for k, v in old.items():
                setattr(abba, k, v)
        med = {"lora": 1.0, **{k: v * 1e-9 for k, v in modelled.items()}}
        cells.append(
            {
                "shape": "s",
                "m": m,
                "n": n,
                "r": r,
                "r1": r // 2,
                "r2": r // 2,
                "tokens": t,
                "dropout": dropout,
            }
            | {"median": med, "peak_bytes": {k: 0 for k in med}, "repeats": 1}
        )
    return cells


def test_fit_recovers_a_cost_model_that_picks_the_fastest_path_everywhere():
    cells = _synthetic_cells(kr_cost=0.5, build_cost=2.5)
    assert {sweep.auto_choice(c, {"KR_COST": 0.5, "BUILD_COST": 2.5}) for c in cells} == set(abba.PATHS)
    fit = sweep.fit_costs(cells)
    assert fit["worst_regret"] == 0.0 and fit["cells"] == len(cells)
    assert all(sweep.regret(c, sweep.auto_choice(c, fit)) == 0.0 for c in cells)
    # wrong constants do leave regret, and the regret is measured against the fastest measured path
    worst = max(sweep.regret(c, sweep.auto_choice(c, {"KR_COST": 5.0, "BUILD_COST": 0.1})) for c in cells)
    assert worst > 0.05


def test_cells_without_the_hybrid_path_are_not_fitted():
    cells = _synthetic_cells(1.0, 1.0)
    for c in cells:
        if not c["dropout"]:
            del c["median"]["hybrid"]
    assert sweep.fit_costs(cells)["cells"] == sum(c["dropout"] for c in cells)


def test_a_real_cell_times_every_path_and_the_table_and_refit_read_it(tmp_path):
    args = argparse.Namespace(device="cpu", dtype="fp32", repeats=1, budget=1e9)
    plain = sweep.run_cell("tiny", 24, 16, 4, 8, args)
    dropped = sweep.run_cell("tiny", 24, 16, 4, 8, args, dropout=True)
    assert set(plain["median"]) == {"lora", "khatri_rao", "merged", "hybrid"}
    assert set(dropped["median"]) == {"lora", "khatri_rao", "merged"}  # no hybrid path under dropout
    assert all(v > 0 for v in plain["median"].values())
    table = sweep.to_markdown([plain, dropped])
    assert table.count("| tiny (24x16) |") == 2 and "| 0.05 |" in table
    out = tmp_path / "sweep.json"
    out.write_text(json.dumps({"cells": [plain, dropped]}))
    res = sweep.refit([out])
    assert res["fit"]["cells"] == 2 and res["fit"]["worst_regret"] >= 0


def test_refit_refuses_sweeps_with_nothing_to_fit(tmp_path):
    out = tmp_path / "old.json"
    cell = _synthetic_cells(1.0, 1.0)[0]
    del cell["median"]["hybrid"]
    out.write_text(json.dumps({"cells": [cell]}))
    with pytest.raises(SystemExit, match="nothing to fit"):
        sweep.refit([out])
