"""Issue 13.10 and 14: eval keeps finished generations on Ctrl-C/SIGTERM, resumes, never overwrites results
silently, never leaves a partial file that looks complete, and refuses a bad --out before generating."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import cli

import abba_cli.eval.evaluate as evaluate

N = 6  # examples per run, batch size 2: three batches


def _invoke(*args: str):
    result = cli(*["eval", *args])
    return result, result.output + (getattr(result, "stderr", "") or "")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    common = ["--task", "gsm8k", "--model", str(model), "--limit", str(N), "--batch-size", "2"]
    return [*common, "--max-new-tokens", "6", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> list[dict]:
    """An uninterrupted run's predictions, to compare interrupted-then-resumed runs with."""
    out = tmp_path_factory.mktemp("ref")
    result, text = _invoke(*_args(tiny_model_dir, out))
    assert result.exit_code == 0, text
    return _read_jsonl(out / "gsm8k" / "predictions.jsonl")


def _interrupt_after_first_batch(monkeypatch, how: str) -> None:
    real = evaluate.generate_batches

    def interrupted(*args, **kwargs):
        for k, batch in enumerate(real(*args, **kwargs)):
            yield batch
            if k == 0:
                if how == "sigterm":  # what `kill PID` sends; GracefulStop lets the batch finish first
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    raise KeyboardInterrupt  # a second Ctrl-C: stops at once

    monkeypatch.setattr(evaluate, "generate_batches", interrupted)


# SIGTERM arrives while batch 2 runs: that batch finishes and is kept. A second Ctrl-C stops at once.
@pytest.mark.parametrize("how, code, kept_rows", [("sigterm", 143, 4), ("keyboard", 130, 2)])
def test_interrupted_eval_keeps_finished_batches_and_resumes(
    how, code, kept_rows, tiny_model_dir, tmp_path, monkeypatch, reference
):
    out = tmp_path / "o"
    _interrupt_after_first_batch(monkeypatch, how)
    result, text = _invoke(*_args(tiny_model_dir, out))
    assert result.exit_code == code, text
    assert "--resume" in text
    assert ("finishing the current batch" in text) == (how == "sigterm")
    task_dir = out / "gsm8k"
    # Nothing that looks finished; the first batch is on disk behind its settings line.
    assert sorted(p.name for p in task_dir.iterdir()) == ["predictions.jsonl.partial"]
    header, *kept = _read_jsonl(task_dir / "predictions.jsonl.partial")
    assert "_resume_key" in header and len(kept) == kept_rows
    monkeypatch.undo()

    # Without --resume (or --overwrite) the interrupted eval is not thrown away.
    result, text = _invoke(*_args(tiny_model_dir, out))
    assert result.exit_code == 2 and "--resume" in text and f"{kept_rows} predictions" in text
    assert len(set(text.strip().splitlines())) == 1  # one line (output and stderr both hold it)

    result, text = _invoke(*_args(tiny_model_dir, out, "--resume"))
    assert result.exit_code == 0, text
    metrics = json.loads((task_dir / "metrics.json").read_text())
    assert (metrics["n"], metrics["resumed"], metrics["generated"]) == (N, kept_rows, N - kept_rows)
    assert _read_jsonl(task_dir / "predictions.jsonl") == reference
    assert sorted(p.name for p in task_dir.iterdir()) == ["metrics.json", "predictions.jsonl"]


def test_finished_results_need_overwrite(tiny_model_dir, tmp_path, reference):
    out = tmp_path / "o"
    assert _invoke(*_args(tiny_model_dir, out))[0].exit_code == 0
    files = {p.name: p.read_bytes() for p in (out / "gsm8k").iterdir()}
    result, text = _invoke(*_args(tiny_model_dir, out, "--limit", "3"))
    assert result.exit_code == 2 and "--overwrite" in text and "Traceback" not in text
    assert len(set(text.strip().splitlines())) == 1  # one line (output and stderr both hold it)
    assert {p.name: p.read_bytes() for p in (out / "gsm8k").iterdir()} == files
    result, text = _invoke(*_args(tiny_model_dir, out, "--limit", "3", "--overwrite"))
    assert result.exit_code == 0, text
    assert _read_jsonl(out / "gsm8k" / "predictions.jsonl") == reference[:3]
    # --resume with a larger --limit reuses the finished three and generates only the new ones.
    result, text = _invoke(*_args(tiny_model_dir, out, "--resume"))
    assert result.exit_code == 0, text
    metrics = json.loads((out / "gsm8k" / "metrics.json").read_text())
    assert (metrics["resumed"], metrics["generated"]) == (3, N - 3)
    assert _read_jsonl(out / "gsm8k" / "predictions.jsonl") == reference
    # Resuming a finished task generates nothing and rewrites the same results.
    result, text = _invoke(*_args(tiny_model_dir, out, "--resume"))
    assert result.exit_code == 0, text
    metrics = json.loads((out / "gsm8k" / "metrics.json").read_text())
    assert (metrics["resumed"], metrics["generated"]) == (N, 0)
    assert _read_jsonl(out / "gsm8k" / "predictions.jsonl") == reference


def test_resume_with_other_settings_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    assert _invoke(*_args(tiny_model_dir, out))[0].exit_code == 0
    result, text = _invoke(*_args(tiny_model_dir, out, "--resume", "--max-new-tokens", "7"))
    assert result.exit_code == 2 and "max_new_tokens" in text and "6" in text and "7" in text
    result, text = _invoke(*_args(tiny_model_dir, out, "--resume", "--overwrite"))
    assert result.exit_code == 2 and "exclude" in text


def test_bad_out_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(evaluate, "load_model_for_eval", no_model)
    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    result, text = _invoke(*_args(tiny_model_dir, a_file))
    assert result.exit_code == 2 and "is a file" in text and "Traceback" not in text
    assert a_file.read_text() == "mine"
    result, text = _invoke(*_args(tiny_model_dir, a_file / "sub"))
    assert result.exit_code == 2 and "is a file" in text
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        result, text = _invoke(*_args(tiny_model_dir, ro / "o"))
        assert result.exit_code == 2 and "not writable" in text


def test_a_truncated_last_line_is_dropped_on_resume(tiny_model_dir, tmp_path, monkeypatch, reference):
    out = tmp_path / "o"
    _interrupt_after_first_batch(monkeypatch, "keyboard")
    _invoke(*_args(tiny_model_dir, out))
    monkeypatch.undo()
    partial = out / "gsm8k" / "predictions.jsonl.partial"
    with partial.open("a") as f:
        f.write('{"id": "gsm8k-5", "prom')  # killed in the middle of a write
    result, text = _invoke(*_args(tiny_model_dir, out, "--resume"))
    assert result.exit_code == 0, text
    assert _read_jsonl(out / "gsm8k" / "predictions.jsonl") == reference


@pytest.mark.slow  # a subprocess: imports torch and transformers again (bounded by its deadlines)
def test_sigterm_to_a_background_eval_keeps_its_batches(tiny_model_dir, tmp_path):
    """A real process, started like `abba eval ... &`, sent SIGTERM once its first batch is on disk."""
    out = tmp_path / "o"
    args = ["--task", "gsm8k", "--model", str(tiny_model_dir), "--limit", "300", "--batch-size", "1"]
    cmd = [sys.executable, "-m", "abba_cli", "eval", *args, "--max-new-tokens", "24", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    partial = out / "gsm8k" / "predictions.jsonl.partial"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.is_file() and len(partial.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "--resume" in err
    header, *kept = _read_jsonl(partial)
    assert "_resume_key" in header and 1 <= len(kept) < 300
    assert (
        not (out / "gsm8k" / "metrics.json").exists() and not (out / "gsm8k" / "predictions.jsonl").exists()
    )


def test_resume_after_an_interrupted_overwrite(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert _invoke(*_args(tiny_model_dir, out))[0].exit_code == 0  # finished with --max-new-tokens 6
    old = (out / "gsm8k" / "predictions.jsonl").read_bytes()
    _interrupt_after_first_batch(monkeypatch, "keyboard")
    result, _ = _invoke(*_args(tiny_model_dir, out, "--overwrite", "--max-new-tokens", "7"))
    assert result.exit_code == 130
    monkeypatch.undo()
    assert (
        out / "gsm8k" / "predictions.jsonl"
    ).read_bytes() == old  # kept until the new results are complete
    # The interrupted run is the latest work: resuming with the old settings would drop it, so it is refused.
    result, text = _invoke(*_args(tiny_model_dir, out, "--resume"))
    assert result.exit_code == 2 and "max_new_tokens" in text
    result, text = _invoke(*_args(tiny_model_dir, out, "--resume", "--max-new-tokens", "7"))
    assert result.exit_code == 0, text
    metrics = json.loads((out / "gsm8k" / "metrics.json").read_text())
    assert (metrics["resumed"], metrics["generated"], metrics["generation"]["max_new_tokens"]) == (
        2,
        N - 2,
        7,
    )
