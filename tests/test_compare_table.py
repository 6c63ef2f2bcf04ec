"""benchmarks/compare_table.py: the comparison's cells come from planted run files, computed by hand here."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import load_benchmark

TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")


def _run(
    root: Path, name: str, val: list[tuple[int, float]], losses: list[float], correct: int | None
) -> None:
    run = root / "final" / name
    run.mkdir(parents=True)
    rows = [{"step": i + 1, "loss": x, "elapsed_s": float(i + 1)} for i, x in enumerate(losses)]
    for step, v in val:
        rows[step - 1]["val_loss"] = v
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "adapter_model.safetensors").write_bytes(b"")  # finished; the table does not read the weights
    if correct is None:
        return
    for task in TASKS:  # every task: 10 questions, `correct` right, 1 invalid; golds 7x "a", 3x "b"
        d = run / "eval" / task
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"task": task, "n": 10, "correct": correct, "invalid": 1}))
        golds = ["a"] * 7 + ["b"] * 3
        (d / "predictions.jsonl").write_text("".join(json.dumps({"gold": g}) + "\n" for g in golds))


def test_final_table_means_spreads_and_pooled_accuracy(tmp_path):
    mod = load_benchmark("compare_table")
    _run(tmp_path, "abba_seed1", [(2, 0.5), (4, 0.3)], [1.0, 0.8, 0.6, 0.4, 0.2], correct=6)
    _run(tmp_path, "abba_seed2", [(2, 0.6), (4, 0.5)], [1.0, 0.8, 0.6, 0.4, 0.4], correct=8)
    _run(tmp_path, "lora_seed1", [(2, 0.9), (4, 0.7)], [2.0, 2.0, 2.0, 2.0, 2.0], correct=None)
    _run(tmp_path, "lora_seed2", [(2, 0.1)], [0.1] * 5, correct=None)
    (tmp_path / "final" / "lora_seed2" / "adapter_model.safetensors").unlink()  # still training: left out
    lines = mod.final_tables(tmp_path)
    abba = next(line for line in lines if line.startswith("| ABBA (sweep's s)"))
    cells = [c.strip() for c in abba.strip("|").split("|")]
    # final val_loss 0.3 and 0.5: mean 0.4, sample std sqrt(0.02) = 0.1414; best = final here
    assert cells[1] == "2" and cells[2] == "0.4000 ± 0.1414 (n=2)" and cells[3] == cells[2]
    # training loss, mean of the last 5 steps: 0.6 and 0.64
    assert cells[4] == "0.6200 ± 0.0283 (n=2)"
    # pooled over 2 seeds x 8 tasks x 10 questions: (6 + 8) * 8 / 160 = 70%, half-width 1.96 sqrt(.21/160) = 7.1
    assert (
        cells[5] == "70.0% (n=160)" and cells[6] == "± 7.1" and cells[7] == "60.0, 80.0" and cells[8] == "16"
    )
    lora = next(line for line in lines if line.startswith("| LoRA"))
    assert "| 1 | 0.7000 |" in lora and "| - |" in lora  # one finished seed, no eval: accuracy is '-'
    boolq = next(line for line in lines if line.startswith("| boolq"))
    # per task: n 10, majority label 70%, base '-', ABBA mean of 60 and 80
    assert [c.strip() for c in boolq.strip("|").split("|")][:5] == ["boolq", "10", "70.0", "-", "70.0"]


def test_plot_is_written(tmp_path):
    mod = load_benchmark("compare_table")
    _run(tmp_path, "hira_seed1", [(2, 0.5), (4, 0.4)], [1.0, 0.9, 0.8, 0.7, 0.6], correct=5)
    out = tmp_path / "plot.png"
    mod.plot(tmp_path, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
