"""The end of a run: the final adapter (or full model), the latest-run record, and where everything is."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from abba_cli.run.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BEST_DIR,
    CHECKPOINTS,
    CONFIG_FILE,
    FULL_MODEL_DIR,
    METRICS_FILE,
    VAL_SUMMARY_FILE,
    base_model_reference,
)
from abba_cli.train.context import Run
from abba_cli.train.state import disk_full_is_a_user_error, gathered_trainable_state


def finish(run: Run) -> None:
    """Save the final adapter (or full model), record the latest run, say where everything is."""
    from abba_cli.adapters import save_adapter
    from abba_cli.run.latest import record_latest

    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    final_tensors = None if run.full else gathered_trainable_state(accelerator, run.model, run.full)
    if run.main:
        unwrapped = accelerator.unwrap_model(run.model)
        with disk_full_is_a_user_error(f"the final {'model' if run.full else 'adapter'}", run.run_dir):
            if run.full:
                _save_full_model(unwrapped, run.tokenizer, run.run_dir / FULL_MODEL_DIR)
            else:
                save_adapter(
                    unwrapped,
                    run.cfg.adapter,
                    run.run_dir,
                    base_model=base_model_reference(run.cfg.model.name_or_path),
                    tensors=final_tensors,
                )
        try:
            record_latest(run.run_dir)
        except OSError as err:  # the run is complete; only the "latest run" shortcut is lost
            print(
                f"warning: could not record the latest run in $ABBA_HOME ({err.strerror}: {err.filename}); "
                f"pass --run {shlex.quote(str(run.run_dir))} to abba eval/merge/export",
                file=sys.stderr,
            )
        _print_outputs(run)
    accelerator.end_training()


def _print_outputs(run: Run) -> None:
    run_dir = run.run_dir
    print(f"run directory: {run_dir}")
    if run.full:
        print(f"  model:    {run_dir / FULL_MODEL_DIR} (plain Hugging Face folder, already 'merged')")
    else:
        print(f"  adapter:  {run_dir / ADAPTER_WEIGHTS} (+ {ADAPTER_CONFIG})")
    print(f"  config:   {run_dir / CONFIG_FILE}")
    print(f"  metrics:  {run_dir / METRICS_FILE}")
    if run.data.val is not None:
        print(f"  validation: {run_dir / VAL_SUMMARY_FILE}")
    best = run.val_tracker.best() if run.val_tracker is not None else None
    if run.cfg.train.keep_best and best is not None:
        print(
            f"  best:     {run_dir / BEST_DIR} (step {best['best_val_step']}, val_loss "
            f"{best['best_val_loss']:.4f}; --run {run_dir / BEST_DIR} takes it)"
        )
    if run.cfg.train.save_every:
        print(f"  checkpoints: {run_dir / CHECKPOINTS}")
    if run.full:
        print("next: abba eval --task <task>   (defaults to this run)")
    else:
        print("next: abba eval --task <task>   |   abba merge --out <dir>   (both default to this run)")


def _save_full_model(model: Any, tokenizer: Any, out: Path) -> None:
    """RUN_DIR/model: the trained weights as a plain Hugging Face folder (safetensors + tokenizer), atomically."""
    from abba_cli.util.files import atomic_directory

    model.config.use_cache = True  # turned off for training; generation from the saved model wants it
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
