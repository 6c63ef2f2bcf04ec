"""benchmarks.gpu_check --smoke: every stage of the GPU call runs (CPU, tiny sizes) and writes what the GPU run
will record, so device time is never spent on a script that has not run. Timings are not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from abba_cli.adapters import cost

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # compiles and trains a tiny model several times: about a minute


def test_smoke_runs_every_stage_and_records_each(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(out)]
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, timeout=900, capture_output=True)
    res = json.loads(out.read_text())
    stages = res["stages"]
    assert list(stages) == ["bf16_error", "step_1x512", "step_8x512", "layers", "decode"]
    assert all("error" not in s for s in stages.values()), {k: s.get("error") for k, s in stages.items()}

    errs = stages["bf16_error"]["result"]
    assert {(r["m"], r["path"]) for r in errs} == {(m, p) for m in (64, 160) for p in ("lora", *cost.PATHS)}
    for r in errs:  # bf16 against float64: a few bf16 ulps, far from a wrong gradient
        assert set(r["rel_err"]) >= {"y", "dx"} and max(r["rel_err"].values()) < 0.05, r

    for stage in ("step_1x512", "step_8x512"):
        rows = stages[stage]["result"]
        seen = {(r["variant"], r["compiled"]) for r in rows}
        assert seen == {(v, False) for v in ("none", "lora", "peft_lora", "abba", "abba_merged",
                                             "abba_khatri_rao", "abba_hybrid")} | {("abba", True)}  # fmt: skip
        assert all(r["ms_per_micro_batch"] > 0 and r["gpu_busy"] is None for r in rows)  # no busy on the CPU

    layers = stages["layers"]["result"]
    assert len(layers["cells"]) == 4 and layers["fit"]["cells"] == 4
    for cell in layers["cells"]:  # the launches recorded are those the cost model prices
        assert {k: v for k, v in cell["launches"].items() if k != "lora"} == cost.path_launches(4, 4)
        assert len(cell["times"]["merged"]) == 2

    decode = stages["decode"]["result"]
    assert [r["batch"] for r in decode] == [2, 4] and all(r["prefill_s"] > 0 for r in decode)
