"""train.early_stopping_patience / early_stopping_min_delta and train.keep_best: the stopping rule, a run that
stops early with the files of a finished run, RUN_DIR/best as a run every command takes, exact --resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import cli, cli_error_line, gsm8k_rows, tiny_config, write_jsonl
from safetensors.torch import load_file

from abba_cli.train.early_stopping import ValTracker

# At lr 0.3 the tiny model's held-out loss drops at step 2, rises for two validations, then falls again: with a
# patience of 2 the run stops at step 4 of 10 and its best is step 2 (checked against the logged losses below).
TRAIN = {
    "max_steps": 10,
    "lr": 0.3,
    "eval_every": 1,
    "early_stopping_patience": 2,
    "keep_best": True,
    "save_every": 1,
    "save_total_limit": 20,
}


def _config(tmp_path: Path, model_dir: Path, out: str, **train) -> Path:
    rows = str(write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(12)))
    return tiny_config(
        tmp_path, model_dir, out, data={"path": rows, "val_samples": 3}, train={**TRAIN, **train}
    )


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _expected_stop(vals: list[tuple[int, float]], patience: int, min_delta: float) -> tuple[int | None, int]:
    """(the step the rule stops after, the step of the lowest val_loss), written out independently."""
    reference, waited, best = None, 0, min(vals, key=lambda sv: sv[1])[0]
    for step, loss in vals:
        if reference is None or reference - loss > min_delta:
            reference, waited = loss, 0
        else:
            waited += 1
        if waited >= patience:
            return step, min((sv for sv in vals if sv[0] <= step), key=lambda sv: sv[1])[0]
    return None, best


def _same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)


@pytest.fixture(scope="module")
def stopped_run(tiny_model_dir, tmp_path_factory) -> tuple[Path, object]:
    """One run that stops early (trained once for the module, in its own ABBA_HOME)."""
    tmp = tmp_path_factory.mktemp("early")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ABBA_HOME", str(tmp / "abba-home"))
        env.setenv("HF_HUB_OFFLINE", "1")
        result = cli("train", _config(tmp, tiny_model_dir, "whole"))
    assert result.exit_code == 0, result.output
    return tmp / "whole", result


def test_tracker_counts_drops_larger_than_min_delta_from_the_last_that_counted():
    tracker = ValTracker(min_delta=0.05)
    seen = [
        (s, tracker.update(s, v), tracker.since_improvement)
        for s, v in enumerate([3.0, 2.9, 2.97, 2.87, 2.84])
    ]
    # 2.9: a drop of 0.1 counts; 2.97: none; 2.87: 0.03 below 2.9 does not count, yet it is the new best;
    # 2.84: 0.06 below 2.9 (the last drop that counted) counts, though only 0.03 below the best.
    assert seen == [(0, True, 0), (1, True, 0), (2, False, 1), (3, True, 2), (4, True, 0)]
    assert (tracker.best_step, tracker.best_loss, tracker.reference_loss) == (4, 2.84, 2.84)
    assert ValTracker(**tracker.state()) == tracker  # what a checkpoint stores restores it whole


def test_run_stops_early_with_the_files_of_a_finished_run(stopped_run):
    run, result = stopped_run
    records = _records(run)
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    stop, best = _expected_stop(vals, patience=2, min_delta=0.0)
    assert stop is not None and stop < 10  # the fixture's premise: this run does stop early
    assert records[-1]["step"] == stop
    assert f"early stopping at step {stop}/10" in result.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json", "config.yaml", "val_summary.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / f"step-{stop}" / "state.json").is_file()  # the final checkpoint
    assert _same_tensors(
        run / "adapter_model.safetensors", run / "checkpoints" / f"step-{stop}" / "adapter_model.safetensors"
    )
    assert Path((run.parent / "abba-home" / "latest_run").read_text().strip()) == run.resolve()
    summary = json.loads((run / "val_summary.json").read_text())
    assert summary["early_stopped_at_step"] == stop and summary["best_val_step"] == best
    assert summary["best_val_loss"] == dict(vals)[best] and summary["best_dir"] == str(run / "best")
    # best/ holds the adapter of the best step, exactly, and says what it is like any run directory.
    assert _same_tensors(
        run / "best" / "adapter_model.safetensors",
        run / "checkpoints" / f"step-{best}" / "adapter_model.safetensors",
    )
    assert (run / "best" / "adapter_config.json").read_text() == (run / "adapter_config.json").read_text()
    assert f"best:     {run / 'best'} (step {best}" in result.stdout


def test_min_delta_makes_small_drops_not_count(tmp_path, tiny_model_dir):
    """A min_delta larger than every later drop: the patience runs out although val_loss still falls."""
    cfg = _config(
        tmp_path,
        tiny_model_dir,
        "delta",
        early_stopping_patience=4,
        early_stopping_min_delta=0.5,
        keep_best=False,
        save_every=None,
    )
    result = cli("train", cfg)
    assert result.exit_code == 0, result.output
    records = _records(tmp_path / "delta")
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert _expected_stop(vals, patience=4, min_delta=0.5)[0] == 5 and records[-1]["step"] == 5
    assert _expected_stop(vals, patience=4, min_delta=0.0)[0] is None  # every drop counted: no stop yet
    assert (tmp_path / "delta" / "checkpoints" / "step-5").is_dir()  # a final checkpoint without save_every
    assert not (tmp_path / "delta" / "best").exists()  # keep_best off


def test_resume_equals_the_uninterrupted_run_best_dir_and_stop_step_included(
    tmp_path, tiny_model_dir, stopped_run, monkeypatch
):
    from abba_cli.train.context import Run

    whole = stopped_run[0]
    cfg = _config(tmp_path, tiny_model_dir, "parted")
    monkeypatch.setattr(Run, "stop_requested", lambda self: self.state.step == 3)  # as a SIGTERM at step 3
    assert cli("train", cfg).exit_code == 143
    monkeypatch.undo()
    run = tmp_path / "parted"
    # best/ lost or stale since the checkpoint: the resume puts back the checkpoint's copy (no later step is
    # better, so nothing else would rewrite it).
    shutil.rmtree(run / "best")
    result = cli("train", cfg, "--resume")
    assert result.exit_code == 0, result.output
    stop = json.loads((whole / "val_summary.json").read_text())["early_stopped_at_step"]
    assert f"early stopping at step {stop}/10" in result.stderr
    for name in ("adapter_model.safetensors", "best/adapter_model.safetensors"):
        assert _same_tensors(run / name, whole / name), name
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rs]  # noqa: E731
    assert strip(_records(run)) == strip(_records(whole))

    def summary(path: Path) -> dict:
        return {
            k: v for k, v in json.loads((path / "val_summary.json").read_text()).items() if k != "best_dir"
        }

    assert summary(run) == summary(whole)
    # Resuming the finished run again stops at once, writing nothing new.
    again = cli("train", cfg, "--resume")
    assert again.exit_code == 0 and f"early stopping at step {stop}/10" in again.stderr
    assert _records(run)[-1]["step"] == stop
    # More patience continues the stopped run from its final checkpoint.
    more = cli("train", cfg, "--resume", "--set", "train.early_stopping_patience=20")
    assert more.exit_code == 0, more.output
    assert _records(run)[-1]["step"] == 10 and "early stopping" not in more.stderr


def test_best_dir_is_a_run_for_every_command(stopped_run, tmp_path):
    run = stopped_run[0]
    best = run / "best"
    best_step = json.loads((run / "val_summary.json").read_text())["best_val_step"]
    chat = ["chat", "--prompt", "What is 6 * 7?", "--max-new-tokens", "6"]
    answer = cli(*chat, "--run", best)
    assert answer.exit_code == 0, answer.output
    assert answer.stdout == cli(*chat, "--run", run / "checkpoints" / f"step-{best_step}").stdout
    commands = {
        "eval": [
            "eval",
            "--task",
            "gsm8k",
            "--limit",
            "1",
            "--max-new-tokens",
            "4",
            "--out",
            tmp_path / "eval",
        ],
        "merge": ["merge", "--out", tmp_path / "merged"],
        "export": ["export", "--format", "peft-lora", "--out", tmp_path / "export"],
    }
    for name, args in commands.items():
        result = cli(*args, "--run", best)
        assert result.exit_code == 0, (name, result.output)
    inspected = cli("inspect", best, "--out", tmp_path / "inspect")
    assert inspected.exit_code == 0, inspected.output
    assert (tmp_path / "merged" / "config.json").is_file() and (
        tmp_path / "export" / "adapter_config.json"
    ).is_file()


@pytest.mark.parametrize(
    ("train", "data", "message"),
    [
        ({"early_stopping_patience": 0}, {}, "train.early_stopping_patience"),
        (
            {"keep_best": True, "eval_every": None, "early_stopping_patience": None},
            {"val_samples": None},
            "train.keep_best follows val_loss",
        ),
        ({"eval_every": None}, {}, "train.early_stopping_patience counts validations: set train.eval_every"),
        (
            {"early_stopping_patience": None, "early_stopping_min_delta": 0.1},
            {},
            "early_stopping_min_delta applies with",
        ),
        ({"early_stopping_min_delta": -1}, {}, "train.early_stopping_min_delta"),
        ({"keep_best": "sometimes"}, {}, "train.keep_best"),
    ],
    ids=[
        "patience-0",
        "best-without-val",
        "patience-without-eval-every",
        "delta-alone",
        "delta-negative",
        "best-not-bool",
    ],
)
def test_bad_settings_are_one_line(tmp_path, tiny_model_dir, train, data, message):
    cfg = _config(tmp_path, tiny_model_dir, "bad", **train)
    if data:
        import yaml

        raw = yaml.safe_load(cfg.read_text())
        raw["data"] = {k: v for k, v in {**raw["data"], **data}.items() if v is not None}
        cfg.write_text(yaml.safe_dump(raw))
    result = cli("train", cfg)
    assert result.exit_code == 2
    assert message in cli_error_line(result)
    assert not (tmp_path / "bad").exists()


def test_keep_best_is_refused_for_full_fine_tuning(tmp_path, tiny_model_dir):
    import yaml

    cfg = _config(tmp_path, tiny_model_dir, "full")
    raw = yaml.safe_load(cfg.read_text())
    raw["adapter"] = {"type": "full"}
    cfg.write_text(yaml.safe_dump(raw))
    result = cli("train", cfg)
    assert result.exit_code == 2 and "adapter.type full trains no adapter" in cli_error_line(result)
