"""Validation loss during training: every train.eval_every steps and at the end, the best so far, and
RUN_DIR/val_summary.json.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from abba_cli.config import RunConfig
from abba_cli.data.collate import to_device
from abba_cli.run.layout import BEST_DIR, VAL_SUMMARY_FILE
from abba_cli.train.context import Run
from abba_cli.train.early_stopping import write_best
from abba_cli.train.loss import count_targets, micro_batch_loss, target_loss_sum
from abba_cli.train.state import gathered_trainable_state
from abba_cli.util.files import atomic_write_text


def validate_if_due(run: Run, bar: Any) -> dict | None:
    """Every train.eval_every steps and at the last: val_loss, the best so far, RUN_DIR/val_summary.json."""
    every, step = run.cfg.train.eval_every, run.state.step
    if run.data.val is None or not (step == run.data.total_steps or (every and step % every == 0)):
        return None
    val = validation_loss(
        run.accelerator,
        run.model,
        run.data.val,
        run.data.collate,
        run.cfg.train.micro_batch_size,
        run.loss_fn,
        run.loss_impl,
    )
    if run.val_tracker.update(step, val["val_loss"]) and run.cfg.train.keep_best:
        tensors = gathered_trainable_state(run.accelerator, run.model, run.full)  # a collective
        if run.main:
            write_best(run, tensors)
    best = run.val_tracker.best()
    if run.main:
        write_val_summary(run.run_dir, step, val, best, keep_best=run.cfg.train.keep_best)
        bar.write(
            f"step {step}: val_loss {val['val_loss']:.4f} "
            f"(best {best['best_val_loss']:.4f} at step {best['best_val_step']})",
            file=sys.stderr,
        )
    return val


def validation_loss(
    accelerator: Any,
    model: Any,
    val_dataset: Any,
    collate: Callable,
    micro_batch_size: int,
    loss_fn: Callable = target_loss_sum,
    loss_impl: str = "full",
) -> dict[str, float | int]:
    """{"val_loss": mean next-token loss per target token of the validation set, "val_tokens": their count}.

    Sums over tokens, then divides by all processes' target count (each process takes every world-th example).
    Eval mode and no_grad, and nothing here draws randomness (no DataLoader iterator, dropout off), so a run
    with validation resumes bit for bit. Every process runs the same number of forwards, as sharded (FSDP)
    models need: one whose shard ran out repeats an example without counting it.
    """
    import torch

    world, rank = accelerator.num_processes, accelerator.process_index
    shard = list(range(rank, len(val_dataset), world))
    n_batches = math.ceil(math.ceil(len(val_dataset) / world) / micro_batch_size)
    loss_sum, targets = 0.0, 0
    model.eval()
    try:
        with torch.no_grad():
            for b in range(n_batches):
                idx = shard[b * micro_batch_size : (b + 1) * micro_batch_size]
                batch = to_device(collate([val_dataset[i] for i in idx or [0]]), accelerator.device)
                # Every process runs the loss too: the chunked loss gathers a sharded head's weight.
                loss = micro_batch_loss(model, batch, loss_impl, loss_fn)
                if idx:
                    loss_sum += float(loss)
                    targets += count_targets(batch["labels"])
    finally:
        model.train()
    if world > 1:
        totals = accelerator.reduce(
            torch.tensor([loss_sum, targets], dtype=torch.float64, device=accelerator.device), "sum"
        )
        loss_sum, targets = float(totals[0]), int(totals[1])
    return {"val_loss": loss_sum / max(targets, 1), "val_tokens": targets}


def write_val_summary(run_dir: Path, step: int, val: dict, best: dict, keep_best: bool = False) -> None:
    summary = {
        **best,
        "last_val_loss": val["val_loss"],
        "last_val_step": step,
        "val_tokens": val["val_tokens"],
    }
    if keep_best:  # RUN_DIR/best holds the adapter of best_val_step
        summary["best_dir"] = str(run_dir / BEST_DIR)
    atomic_write_text(run_dir / VAL_SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def describe_validation(cfg: RunConfig, n: int) -> str:
    d, every = cfg.data, cfg.train.eval_every
    source = "held out of the training source (data.val_samples)" if d.val_samples else f"from {d.val_path}"
    when = (
        f"every {every} steps and at the end"
        if every
        else "at the end only (set train.eval_every for a curve)"
    )
    return f"validation: {n} examples {source}; val_loss {when}"
