"""`abba eval` under torchrun: 2 CPU processes (gloo) share the prompts, each generating about half, and the main
process writes one results folder whose predictions are exactly those of one process (fp32 greedy decoding does
not depend on which prompts share a batch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli, subprocess_env

pytestmark = pytest.mark.slow

WORKER = Path(__file__).resolve().parents[1] / "train" / "abba_worker.py"
TIMEOUT_S = 300  # a lost peer hangs gloo forever; the launch takes about 20 s
N = 8


def _args(model: Path, out: Path) -> list[str]:
    return ["eval", "--task", "gsm8k", "--model", str(model), "--limit", str(N), "--batch-size", "2",
            "--max-new-tokens", "6", "--out", str(out)]  # fmt: skip


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "gsm8k" / "predictions.jsonl").read_text().splitlines()]


def test_two_processes_give_the_predictions_of_one(tiny_model_dir, tmp_path):
    one = cli(*_args(tiny_model_dir, tmp_path / "one"))
    assert one.exit_code == 0, one.output
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*launch, str(WORKER), *_args(tiny_model_dir, tmp_path / "two")],
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert two.returncode == 0, two.stderr[-4000:]
    assert _rows(tmp_path / "two") == _rows(tmp_path / "one")
    assert len({r["output"] for r in _rows(tmp_path / "one")}) > 1  # distinct outputs, in the same order
    metrics = json.loads((tmp_path / "two" / "gsm8k" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["n"] == N and metrics["generated"] == N
    assert metrics["generated_per_process"] == [N // 2, N // 2]
    assert json.loads((tmp_path / "one" / "gsm8k" / "metrics.json").read_text())["processes"] == 1
    assert sorted(p.name for p in (tmp_path / "two" / "gsm8k").iterdir()) == [
        "metrics.json",
        "predictions.jsonl",
    ]
    assert two.stdout.count("accuracy") == 1  # the table printed once, by the main process
