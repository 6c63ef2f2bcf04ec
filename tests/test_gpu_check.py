"""benchmarks/gpu_check.py --smoke: the GPU call's every stage runs (on the CPU, tiny sizes) before GPU time is
spent on it, and its JSON holds what RESULTS.md will be written from."""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark

pytestmark = pytest.mark.slow  # every variant eager and compiled, twice: about a minute on 2 cores


def test_smoke_runs_every_stage_and_writes_the_json(tmp_path):
    gpu_check = load_benchmark("gpu_check")
    gpu_check.main(["--smoke", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    for stage in ("errors", "shipped", "batch8", "layers", "decode"):
        assert "result" in report[stage], (stage, report[stage])
    # bf16 against float64: every exact path within bf16's precision on output and gradients
    for cell in report["errors"]["result"].values():
        assert set(cell) == {"khatri_rao", "merged", "hybrid"}
        for errors in cell.values():
            assert all(0 < e < 0.05 for e in errors.values()), errors
    for stage in ("shipped", "batch8"):
        rows = report[stage]["result"]["rows"]
        expected = {f"{v}{c}" for v in gpu_check.VARIANTS for c in ("", " compiled")}
        assert set(rows) == expected
        assert all("ms_per_micro_batch" in row for row in rows.values()), rows
    assert report["layers"]["result"]["fit"]["cells"] >= 1
    assert (tmp_path / "layer_sweep.json").is_file()
    assert all(r["ms_per_decode_step"] > 0 for r in report["decode"]["result"]["rows"].values())
