"""The best validation so far, early stopping, and RUN_DIR/best.

`ValTracker` follows val_loss: the lowest so far (what RUN_DIR/best holds with train.keep_best) and, for
train.early_stopping_patience, how many validations passed since val_loss last dropped by more than
train.early_stopping_min_delta below the last drop that counted (so a slow decline still counts once it adds
up). Its state travels in each checkpoint's state.json, and the best adapter as a file beside the checkpoint's
own, so a resumed run stops at the same step with the same RUN_DIR/best as one never interrupted.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from abba_cli.run.layout import (
    ADAPTER_WEIGHTS,
    BEST_DIR,
    CHECKPOINT_BEST_WEIGHTS,
    CONFIG_FILE,
    VAL_SUMMARY_FILE,
)
from abba_cli.train.context import Run
from abba_cli.util.files import atomic_write_text


@dataclass
class ValTracker:
    min_delta: float = 0.0
    best_loss: float | None = None
    best_step: int | None = None
    reference_loss: float | None = None  # val_loss of the last drop that counted for the patience
    since_improvement: int = 0  # validations since that drop

    def update(self, step: int, val_loss: float) -> bool:
        """Count one validation; True when it is the lowest val_loss so far."""
        if self.reference_loss is None or val_loss < self.reference_loss - self.min_delta:
            self.reference_loss, self.since_improvement = val_loss, 0
        else:
            self.since_improvement += 1
        if self.best_loss is None or val_loss < self.best_loss:
            self.best_loss, self.best_step = val_loss, step
            return True
        return False

    def best(self) -> dict[str, Any] | None:
        """{"best_val_loss", "best_val_step"} for val_summary.json and the progress bar (None before any)."""
        return (
            None
            if self.best_step is None
            else {"best_val_loss": self.best_loss, "best_val_step": self.best_step}
        )

    def state(self) -> dict[str, Any]:
        return asdict(self)


def restored_tracker(saved: dict | None, metrics: Path, step: int, min_delta: float) -> ValTracker:
    """The tracker of a resumed run: from its checkpoint, or (checkpoints written before it was saved there)
    replayed from the validations metrics.jsonl logged up to `step`."""
    if saved is not None:
        return ValTracker(**{**saved, "min_delta": min_delta})
    tracker = ValTracker(min_delta)
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a half-written last line (the main process drops it)
            if isinstance(record, dict) and "val_loss" in record and record.get("step", step + 1) <= step:
                tracker.update(record["step"], record["val_loss"])
    return tracker


def stop_due(run: Run) -> bool:
    patience = run.cfg.train.early_stopping_patience
    return patience is not None and run.val_tracker.since_improvement >= patience


def say_stopped(run: Run, checkpoint: Path | None) -> None:
    """Why the run stops at this step, on stderr and in val_summary.json (main process)."""
    step, t, tracker = run.state.step, run.cfg.train, run.val_tracker
    summary_path = run.run_dir / VAL_SUMMARY_FILE
    summary = json.loads(summary_path.read_text())
    summary["early_stopped_at_step"] = step
    atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    print(
        f"early stopping at step {step}/{run.data.total_steps}: val_loss has not dropped by more than "
        f"{t.early_stopping_min_delta:g} for {t.early_stopping_patience} validation(s) (best "
        f"{tracker.best_loss:.4f} at step {tracker.best_step}); final checkpoint {checkpoint}",
        file=sys.stderr,
    )


def write_best(run: Run, tensors: dict) -> None:
    """RUN_DIR/best: `tensors` (the current adapter) as a run directory of its own (adapter,
    adapter_config.json and the run's config.yaml), so every command's --run takes it. Main process."""
    from abba_cli.adapters import save_adapter
    from abba_cli.run.layout import base_model_reference
    from abba_cli.util.files import atomic_directory

    with atomic_directory(run.run_dir / BEST_DIR, overwrite=True) as tmp:
        save_adapter(
            run.accelerator.unwrap_model(run.model),
            run.cfg.adapter,
            tmp,
            base_model=base_model_reference(run.cfg.model.name_or_path),
            tensors=tensors,
        )
        shutil.copyfile(run.run_dir / CONFIG_FILE, tmp / CONFIG_FILE)


def best_weights_to_checkpoint(run: Run) -> Path | None:
    """The file a checkpoint keeps as its copy of RUN_DIR/best (None without train.keep_best or a best yet)."""
    path = run.run_dir / BEST_DIR / ADAPTER_WEIGHTS
    return path if run.cfg.train.keep_best and path.is_file() else None


def restore_best(run: Run, checkpoint: Path | None) -> None:
    """On --resume, RUN_DIR/best as it was at the checkpoint (none before any): a best written after it by the
    interrupted run is replaced, so the resumed run ends with the best/ of a run never interrupted. Main process."""
    from abba_cli.run.layout import read_adapter_tensors

    if not run.cfg.train.keep_best:
        return
    best = run.run_dir / BEST_DIR
    copy = checkpoint / CHECKPOINT_BEST_WEIGHTS if checkpoint is not None else None
    if copy is not None and copy.is_file():
        write_best(run, read_adapter_tensors(copy))
    elif best.exists():
        shutil.rmtree(best)
