"""The run directory while `abba train` writes it: checked before the model loads, locked for the run's life,
never overwritten, and compared with the config on `--resume`.

A second `abba train` on a directory in use fails at once: the main process holds an exclusive flock on
RUN_DIR/.lock (the file names the holder's pid) until the run ends, and removes it then. A kill -9 leaves the
file, but the kernel drops the lock with the process, so the next run takes it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abba_cli.errors import UserError
from abba_cli.run.layout import CONFIG_FILE, LOCK_FILE, latest_checkpoint, read_saved_config
from abba_cli.util.files import atomic_write_text

# Keys that may change between a run and its --resume without breaking exactness.
RESUME_MAY_CHANGE = (
    "train.save_every",
    "train.save_total_limit",
    "train.log_every",
    "train.eval_every",  # validation draws no randomness, so its cadence never changes training
    "train.report_to",
    # When to stop, not how to train: more patience continues a run that stopped early from its last checkpoint.
    "train.early_stopping_patience",
    "train.early_stopping_min_delta",
    "eval.",
)
# Keys that may change on --resume only to extend the run to a larger total of steps.
RESUME_EXTENDS = ("train.max_steps", "train.epochs")


def resume_hint(run_dir: Path) -> str:
    """The command that resumes a run, copy-pasteable into a shell whatever the path holds."""
    return f"abba train {shlex.quote(str(run_dir / CONFIG_FILE))} --resume"


def output_dir_error(run_dir: Path, err: OSError) -> UserError:
    """What an OSError while creating or writing the run directory means, in one line."""
    reasons = {
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOTDIR: "a part of the path is a file, not a directory",
        errno.EEXIST: "a file or dangling symlink is in the way",
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
    }
    reason = reasons.get(err.errno, err.strerror or type(err).__name__)
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(run_dir) else ""
    return UserError(f"output_dir {run_dir}: {reason}{where}; choose another output_dir")


class RunLock:
    """Context manager: create RUN_DIR if needed and hold an exclusive lock on RUN_DIR/.lock (main process)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> RunLock:
        self._created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._fd = self._acquire()
        except OSError as err:
            raise output_dir_error(self.run_dir, err) from None
        return self

    def _acquire(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                pid = f" (pid {holder})" if holder.isdigit() else ""
                raise UserError(
                    f"output_dir {self.run_dir} is in use by another abba train{pid}; wait for it to end, "
                    "or choose another directory (--set output_dir=...)"
                ) from None
            # The holder before us may have removed the file between our open and our lock: then we hold a
            # lock on a deleted file, and must lock the file now at the path instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
            # A run that failed before writing anything leaves no empty directory behind (a retry would be
            # refused with "already exists" otherwise).
            if self._created and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()
        except OSError:
            pass
        finally:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


def is_empty_run_dir(run_dir: Path) -> bool:
    """True when there is nothing in run_dir but (possibly) a lock file: nothing to overwrite."""
    if not run_dir.exists():
        return True
    return run_dir.is_dir() and all(p.name == LOCK_FILE for p in run_dir.iterdir())


@dataclass
class Resume:
    """What --resume continues from: the latest checkpoint, and the saved train section when the run is being
    extended (train.max_steps / train.epochs changed; the new total is checked once the data is loaded)."""

    checkpoint: Path | None
    extends: dict | None = None


def check_run_dir(cfg_json: dict, run_dir: Path, resume: bool) -> Resume | None:
    """Refuse to overwrite a run (None: a fresh run); for --resume, check the config matches the saved one and
    pick the latest checkpoint."""
    if not resume:
        if not is_empty_run_dir(run_dir):
            raise UserError(
                f"output_dir {run_dir} already exists; pass --resume to continue that run, or choose a new "
                f"directory (--set output_dir=...)"
            )
        return None
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(
            f"--resume: {run_dir} holds no run to resume (no {CONFIG_FILE}); train without --resume"
        )
    saved = read_saved_config(run_dir)
    # Runs saved before the `distributed` section existed trained with its defaults (ddp).
    saved.setdefault("distributed", cfg_json.get("distributed") if _is_default_ddp(cfg_json) else None)
    # Keys added later: a run saved before them trained with their defaults (the loss was then the full one,
    # which `auto` may replace by the chunked one: the same values up to round-off).
    saved.setdefault("data", {}).setdefault("packing", False)
    saved.setdefault("train", {}).setdefault("loss_impl", "auto")
    diffs = [k for k in diff_keys(saved, cfg_json) if not k.startswith(RESUME_MAY_CHANGE)]
    extends = bool(diffs) and all(k in RESUME_EXTENDS for k in diffs)
    if diffs and not extends:
        raise UserError(
            f"--resume: the config differs from {run_dir / CONFIG_FILE} in {', '.join(diffs)}; "
            "an exact resume needs the same settings"
        )
    latest = latest_checkpoint(run_dir)
    if extends and latest is None:
        raise UserError(
            f"--resume: a new {' / '.join(diffs)} extends a run from its last checkpoint, and {run_dir} has "
            "none (train.save_every was not set); start a new run instead"
        )
    if latest is None:
        print(f"--resume: no checkpoint in {run_dir} yet; starting it from step 0", file=sys.stderr)
    return Resume(latest, dict(saved.get("train") or {}) if extends else None)


def _is_default_ddp(cfg_json: dict) -> bool:
    from abba_cli.config import DistributedConfig

    return cfg_json.get("distributed") == DistributedConfig().model_dump(mode="json")


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = list(dict.fromkeys([*a, *b]))
        return [d for k in keys for d in diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past `step` (after a resume those steps are run and logged again), and a half-written
    last line left by a kill mid-write."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                print(f"{path}: dropped a half-written last line (line {number})", file=sys.stderr)
                continue
            raise UserError(
                f"{path}, line {number}: not a JSON record; fix or delete that line to resume"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}, line {number}: a record without an integer 'step'; fix or delete it")
        if record["step"] <= step:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))
