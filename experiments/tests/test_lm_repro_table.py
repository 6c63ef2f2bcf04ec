"""experiments/lm_repro_table.py: every cell comes from the run files, missing ones show as '-'."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from experiments import lm_repro_table


def _eval(run: Path, task: str, n: int, correct: int, invalid: int, seconds: float = 2.0) -> None:
    d = run / "eval" / task
    d.mkdir(parents=True)
    metrics = {
        "task": task,
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "invalid": invalid,
        "seconds": seconds,
    }
    (d / "metrics.json").write_text(json.dumps(metrics))


def _train_log(run: Path, losses: list[float]) -> None:
    rows = [
        {"step": i + 1, "loss": x, "elapsed_s": 10.0 * (i + 1), "tokens": 100 * (i + 1)}
        for i, x in enumerate(losses)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_from_run_files(tmp_path):
    s = tmp_path / "commonsense"
    for task, c in (("boolq", 5), ("piqa", 6)):
        _eval(s / "base", task, 10, c - 4, 3)
        _eval(s / "abba", task, 10, c, 0)
    (s / "abba").mkdir(exist_ok=True)
    _train_log(s / "abba", [2.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    save_file(
        {"x.B1": torch.zeros(4, 2), "x.A1": torch.zeros(2, 3)}, str(s / "abba" / "adapter_model.safetensors")
    )
    full = s / "full" / "model"
    full.mkdir(parents=True)
    save_file({"w": torch.zeros(5, 7)}, str(full / "model.safetensors"))

    golds = ["true"] * 7 + ["false"] * 3
    preds = "".join(json.dumps({"gold": g, "extracted": None}) + "\n" for g in golds)
    (s / "abba" / "eval" / "boolq" / "predictions.jsonl").write_text(preds)
    text = lm_repro_table.main(
        ["--root", str(tmp_path), "--settings", "commonsense", "--out", str(tmp_path / "t.md")]
    )
    assert (tmp_path / "t.md").read_text() == text
    lines = text.splitlines()
    assert "| boolq | 10 | 70.0 | 10.0 (3) | 50.0 (0) | - | - | - |" in lines  # 7 of 10 golds are 'true'
    assert "| piqa | 10 | - | 20.0 (3) | 60.0 (0) | - | - | - |" in lines  # no predictions file: no prior
    assert "| **average** | |  | 15.0 | 55.0 | - | - | - |" in lines  # no majority: piqa has none
    # pooled 11/20 = 55%: half-width 1.96 * sqrt(.55 * .45 / 20) = 21.8 points
    assert "| **pooled, 95% CI** | 20 | | 15.0 ± 15.6 | 55.0 ± 21.8 | - | - | - |" in lines
    # 14 adapter parameters; loss 2.0 first, mean of the last five steps 0.9; 60 s of training; 4 s of eval.
    assert "| ABBA | 14 | 6 | 2.000 -> 0.900 | 60 | 4 |" in lines
    assert "| boolq | - | 0 | - | - | - |" in lines  # ABBA's predictions above extracted nothing
    assert "| full FT | 35 | - | - | - | - |" in lines
    assert "| LoRA | - | - | - | - | - |" in lines
