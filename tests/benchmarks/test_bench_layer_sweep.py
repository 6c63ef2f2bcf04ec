"""The layer sweep's bookkeeping (benchmarks/layer_sweep.py): every path is measured, `auto`'s regret and the
cost-model fit are computed right. Timings themselves are never asserted (benchmarks are not tests)."""

from __future__ import annotations

import argparse
import itertools
import json

import pytest

from abba_cli.adapters import abba
from benchmarks import layer_sweep as sweep

PLAIN = {"KR_COST": 1.0, "HYBRID_COST": 1.0, "BUILD_COST": 1.0, "ELEMENT_COST": 0.0, "KR_ELEMENT_COST": 0.0}
# A small grid holding the constants the synthetic cells are made from (the default grid takes ~30 s per fit).
GRID = {
    "KR_COST": [0.5, 1.0, 2.0],
    "HYBRID_RATIO": [1.0, 1.2],
    "BUILD_COST": [0.5, 1.0, 2.5],
    "ELEMENT_COST": [0.0, 8.0, 64.0],
    "KR_ELEMENT_COST": [0.0, 8.0],
}


def _synthetic_cells(constants: dict[str, float]) -> list[dict]:
    """Cells whose 'measured' times are exactly what the cost model says with the given constants."""
    cells = []
    shapes = [(576, 576), (1536, 576), (2048, 2048), (4096, 4096), (14336, 4096)]
    for (m, n), r, t, dropout in itertools.product(shapes, (8, 32, 128), (256, 2048, 8192), (False, True)):
        modelled = abba.path_costs(m, n, r // 2, r // 2, t, dropout, constants)
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
    truth = {
        "KR_COST": 0.5,
        "HYBRID_COST": 0.6,
        "BUILD_COST": 2.5,
        "ELEMENT_COST": 64.0,
        "KR_ELEMENT_COST": 8.0,
    }
    cells = _synthetic_cells(truth)
    assert {sweep.auto_choice(c, truth) for c in cells} == set(abba.PATHS)
    fit = sweep.fit_costs(cells, GRID)
    assert fit["worst_regret"] == 0.0 and fit["cells"] == len(cells)
    assert all(sweep.regret(c, sweep.auto_choice(c, fit)) == 0.0 for c in cells)
    # wrong constants do leave regret, and the regret is measured against the fastest measured path
    wrong = {
        "KR_COST": 5.0,
        "HYBRID_COST": 5.0,
        "BUILD_COST": 0.1,
        "ELEMENT_COST": 0.0,
        "KR_ELEMENT_COST": 0.0,
    }
    assert max(sweep.regret(c, sweep.auto_choice(c, wrong)) for c in cells) > 0.05


def test_cells_without_the_hybrid_path_are_not_fitted():
    cells = _synthetic_cells(PLAIN)
    for c in cells:
        if not c["dropout"]:
            del c["median"]["hybrid"]
    assert sweep.fit_costs(cells, GRID)["cells"] == sum(c["dropout"] for c in cells)


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
    res = sweep.refit([out], GRID, out=tmp_path / "fitted.json")

    # auto's worst regret under the fitted constants, worked out from the two cells' measured medians
    def regret(cell, paths):
        med = cell["median"]
        return med[sweep.auto_choice(cell, res["fit"])] / min(med[p] for p in paths) - 1.0

    worst = max(regret(plain, ("khatri_rao", "merged", "hybrid")), regret(dropped, ("khatri_rao", "merged")))
    assert res["fit"]["cells"] == 2 and res["fit"]["worst_regret"] == pytest.approx(worst, abs=1e-4)
    saved = json.loads((tmp_path / "fitted.json").read_text())
    assert saved["cost_model"] == {k: res["fit"][k] for k in sweep.COST_NAMES} and len(saved["cells"]) == 2


def test_refit_lets_a_later_measurement_of_a_cell_replace_the_earlier_one(tmp_path):
    cells = _synthetic_cells(PLAIN)
    noisy = json.loads(json.dumps(cells[:1]))
    noisy[0]["median"]["merged"] *= 10  # an outlier in the first sweep
    first, again = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"cells": noisy + cells[1:]}))
    again.write_text(json.dumps({"cells": cells[:1]}))
    assert len(sweep.refit([first, again], GRID)["cells"]) == len(cells)
    assert sweep.refit([first, again], GRID)["fit"]["worst_regret"] == 0.0


def test_refit_refuses_sweeps_with_nothing_to_fit(tmp_path):
    out = tmp_path / "old.json"
    cell = _synthetic_cells(PLAIN)[0]
    del cell["median"]["hybrid"]
    out.write_text(json.dumps({"cells": [cell]}))
    with pytest.raises(SystemExit, match="nothing to fit"):
        sweep.refit([out], GRID)
