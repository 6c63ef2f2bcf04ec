"""One eval task's results folder, `<out>/<task>/`: written as generations finish, resumable, never half-done.

- While running, each finished batch is appended to `predictions.jsonl.partial` and fsynced, so Ctrl-C, SIGTERM
  or a crash keeps every finished generation. Its first line holds the settings the predictions depend on.
- When the task completes, `predictions.jsonl` and then `metrics.json` are written atomically and the partial
  file is removed. `metrics.json` is what marks a task as finished; a folder without it never looks complete.
- Under a launcher each process appends its own share to its own partial file
  (`predictions.rank<N>.jsonl.partial` beside the main process's); the main process alone writes the finished
  files and removes every partial one.
- An existing finished result or interrupted partial is never replaced silently: `--resume` continues it
  (skipping finished ids, refused if the settings differ), `--overwrite` starts again (the old files stay until
  the new ones are complete).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abba_cli.errors import UserError
from abba_cli.util.files import atomic_file, atomic_write_json

EVAL_DIR = "eval"  # RUN_DIR/eval/<task>/ for the run's own base (eval/target.py picks other folders)
PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
PARTIAL = "predictions.jsonl.partial"
_KEY = "_resume_key"  # the partial file's first line: {"_resume_key": {...}}


def run_eval_dir(run_dir: Path) -> Path:
    """Where `abba eval` of a run on its own base writes its tasks' folders."""
    return Path(run_dir) / EVAL_DIR


def task_finished(results_dir: Path, task: str) -> bool:
    """metrics.json is written last: a task folder holding it is complete."""
    return (Path(results_dir) / task / METRICS).is_file()


def read_task_metrics(results_dir: Path) -> dict[str, dict]:
    """{task: its metrics.json} of the finished tasks under a results folder (RUN_DIR/eval)."""
    out = {}
    for path in sorted(Path(results_dir).glob(f"*/{METRICS}")):
        data = json.loads(path.read_text())
        out[data["task"]] = data
    return out


def read_predictions(results_dir: Path, task: str) -> list[dict] | None:
    """A finished task's predictions.jsonl rows (None when the task has none)."""
    path = Path(results_dir) / task / PREDICTIONS
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def partial_path(task_dir: Path, rank: int = 0) -> Path:
    """The partial predictions file of one process (the main process's keeps the name it has alone)."""
    return task_dir / (PARTIAL if rank == 0 else f"predictions.rank{rank}.jsonl.partial")


def partial_files(task_dir: Path) -> list[Path]:
    """Every process's partial predictions file in `task_dir`, the main process's first."""
    ranks = sorted(task_dir.glob("predictions.rank*.jsonl.partial")) if task_dir.is_dir() else []
    main = task_dir / PARTIAL
    return ([main] if main.is_file() else []) + ranks


def refuse_existing(task_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Before any generation: finished or interrupted results need --resume or --overwrite."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: continue the results, or replace them")
    if resume or overwrite:
        return
    if (task_dir / METRICS).is_file():
        raise UserError(
            f"{task_dir}: finished results exist; --overwrite replaces them, --resume reuses them "
            "(e.g. to extend them with a larger --limit), or choose another --out"
        )
    if partials := partial_files(task_dir):
        raise UserError(
            f"{task_dir}: an interrupted eval is there ({sum(map(_count_rows, partials))} predictions); "
            "--resume continues it, --overwrite starts again"
        )
    if task_dir.exists() and not task_dir.is_dir():
        raise UserError(f"{task_dir}: is a file, not a results directory")


def _count_rows(path: Path) -> int:
    return max(0, sum(1 for line in path.read_text().splitlines() if line.strip()) - 1)


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a last line cut short by a kill is dropped (it was never fsynced as complete)."""
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path}: line {i + 1} is not JSON; --overwrite starts the task again") from None
    return rows


def _key_mismatch(task_dir: Path, old: dict, new: dict) -> UserError:
    diffs = [
        f"{k} {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    return UserError(
        f"--resume {task_dir}: its predictions were made with other settings ({'; '.join(diffs)}); "
        "rerun with the same settings, or --overwrite"
    )


def reusable_predictions(task_dir: Path, key: dict[str, Any]) -> dict[str, dict]:
    """For --resume: by id, the predictions (finished and partial) made with the same settings as `key`.

    The partial file is the latest work: it must match, else --resume is refused. An --overwrite that was
    interrupted leaves the old finished results beside it; those are reused only if their settings match too.
    """
    stored: list[tuple[dict, list[dict]]] = []  # (settings, rows), oldest first
    if (task_dir / METRICS).is_file() and (task_dir / PREDICTIONS).is_file():
        old_key = json.loads((task_dir / METRICS).read_text()).get("resume_key") or {}
        stored.append((old_key, _read_jsonl(task_dir / PREDICTIONS)))
    finished = len(stored)
    for partial in partial_files(task_dir):
        lines = _read_jsonl(partial)
        if not lines or _KEY not in lines[0]:
            raise UserError(f"{partial}: no settings line; --overwrite starts the task again")
        stored.append((lines[0][_KEY], lines[1:]))
    # The partial files if there are any (each must match), else the finished results.
    for settings, _ in stored[finished:] or stored[-1:]:
        if settings != key:
            raise _key_mismatch(task_dir, settings, key)
    matching = [rows for settings, rows in stored if settings == key]
    return {r["id"]: r for rows in matching for r in rows}


class PartialPredictions:
    """Append-only `predictions.jsonl.partial`: each `append` is flushed and fsynced before it returns."""

    def __init__(self, task_dir: Path, key: dict[str, Any], *, fresh: bool, rank: int = 0) -> None:
        task_dir.mkdir(parents=True, exist_ok=True)
        self.path = partial_path(task_dir, rank)
        existing = self.path.is_file() and not fresh
        self._f = open(self.path, "a" if existing else "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if not existing:
            self._write([{_KEY: key}])

    def _write(self, rows: list[dict]) -> None:
        self._f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self._f.flush()
        os.fsync(self._f.fileno())

    def append(self, rows: list[dict]) -> None:
        self._write(rows)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> PartialPredictions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def finalize(task_dir: Path, rows: list[dict], metrics: dict[str, Any]) -> None:
    """Write predictions.jsonl, then metrics.json (the 'finished' mark), atomically; drop the partial files."""
    with atomic_file(task_dir / PREDICTIONS) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    atomic_write_json(task_dir / METRICS, metrics)
    drop_partials(task_dir)


def drop_partials(task_dir: Path) -> None:
    """Remove every process's partial file (a fresh start must not leave an older run's rows to a later --resume)."""
    for partial in partial_files(task_dir):
        partial.unlink(missing_ok=True)


def say_kept(task_dir: Path, done: int, total: int) -> None:
    print(
        f"{task_dir.name}: stopped after {done} of {total} predictions, kept in {task_dir / PARTIAL}; "
        "run the same command with --resume to continue",
        file=sys.stderr,
        flush=True,
    )


@dataclass(frozen=True)
class TaskResult:
    task: str
    n: int
    correct: int
    invalid: int
    seconds: float
    out_dir: Path

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


def format_table(results: Sequence[TaskResult]) -> str:
    width = max([len("task")] + [len(r.task) for r in results])
    lines = [f"{'task':<{width}}  {'n':>6}  {'accuracy':>8}  {'invalid':>7}"]
    for r in results:
        lines.append(f"{r.task:<{width}}  {r.n:>6}  {100 * r.accuracy:>7.2f}%  {r.invalid:>7}")
    return "\n".join(lines)
