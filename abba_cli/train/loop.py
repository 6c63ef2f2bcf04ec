"""The optimisation loop: accumulate micro-batches, clip, step, validate, log, checkpoint; stop on a non-finite
loss or weights, or after the current step (with a checkpoint) when a stop signal was caught.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from abba_cli.data.collate import batch_tokens, to_device
from abba_cli.data.order import batch_stream
from abba_cli.errors import UserError
from abba_cli.run.layout import METRICS_FILE
from abba_cli.run.training_dir import resume_hint
from abba_cli.train.context import Run
from abba_cli.train.early_stopping import say_stopped, stop_due
from abba_cli.train.loss import count_targets
from abba_cli.train.state import checkpoint_or_stop, final_checkpoint
from abba_cli.train.val_loss import validate_if_due


def fit(run: Run) -> None:
    """The optimisation loop: accumulate micro-batches, clip, step, validate, log, checkpoint; stop on a
    non-finite loss, or after the current step (with a checkpoint) when run.stop caught SIGINT/SIGTERM."""
    from tqdm.auto import tqdm

    t, state, accelerator = run.cfg.train, run.state, run.accelerator
    batches = batch_stream(
        len(run.data.train),
        t.micro_batch_size,
        t.seed,
        accelerator.num_processes,
        accelerator.process_index,
        state.micro_batches_seen,
        run.data.per_epoch,
        list(run.data.train["length"]) if run.cfg.data.group_by_length else None,
    )
    bar = tqdm(
        total=run.data.total_steps,
        initial=state.step,
        disable=not run.main,
        unit="step",
        dynamic_ncols=True,
        desc="train",
    )
    clock = (time.perf_counter(), state.elapsed_s, state.tokens_seen)
    run.model.train()
    try:
        while state.step < run.data.total_steps:
            if stop_due(run):  # checked here, so resuming a run that stopped early stops again at once
                checkpoint = final_checkpoint(run)  # more patience can resume from it
                if run.main:
                    say_stopped(run, checkpoint)
                break
            host = [
                run.data.collate([run.data.train[i] for i in idx])
                for _, _, idx in (next(batches) for _ in range(t.grad_accum_steps))
            ]
            micro = [to_device(b, accelerator.device) for b in host]
            loss_value = accumulate_gradients(run, host, micro)
            grad_norm, lr = apply_update(run, loss_value)
            tok_s = advance(run, host, clock)
            bar.update(1)
            val = validate_if_due(run, bar)
            postfix = dict(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            if run.val_tracker.best_loss is not None:
                postfix["best_val"] = f"{run.val_tracker.best_loss:.4f}"
            bar.set_postfix(postfix)
            log_step(run, loss_value, lr, float(grad_norm), tok_s, val)
            checkpoint_or_stop(run)
    finally:
        bar.close()


def accumulate_gradients(run: Run, host: list[dict], micro: list[dict]) -> float:
    """Forward and backward over one optimizer step's micro-batches; returns the step's loss (all processes).

    Normalised by the target tokens of the whole optimizer step, so accumulation equals one big batch. Across
    processes too: DDP averages gradients over processes, so each process scales its token sum by
    world / (targets of all processes); a global batch then trains exactly as one process would.
    """
    import torch

    accelerator, world = run.accelerator, run.accelerator.num_processes
    # Counted on the host copies (`micro` is them on the device): int() of a device tensor is a host sync (on a
    # GPU, one per micro-batch, each waiting for the queue to drain).
    all_targets = sum(count_targets(b["labels"]) for b in host)
    if world > 1:
        all_targets = int(
            accelerator.reduce(torch.tensor(all_targets, device=accelerator.device), "sum").item()
        )
    n_targets = max(all_targets, 1) / world
    # DeepSpeed divides each micro-batch's loss by its gradient_accumulation_steps unless told not to; the
    # loss here is already normalised over the whole step.
    backward_kwargs = {"scale_wrt_gas": False} if run.deepspeed else {}
    step_loss = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1
        # What accelerator.accumulate() would set: gradients sync (DDP all-reduce, FSDP2 reduce-scatter) on the
        # last micro-batch only, and under DeepSpeed accelerator.backward marks that micro-batch as the
        # accumulation boundary and steps the engine there, once per optimizer step. accumulate() itself is
        # not used: it needs Accelerator(gradient_accumulation_steps=N), which divides every loss by N again.
        accelerator.gradient_state._set_sync_gradients(sync)
        with nullcontext() if sync else accelerator.no_sync(run.model):
            loss = run.micro_batch_loss(batch) / n_targets
            accelerator.backward(loss, **backward_kwargs)
        step_loss += loss.detach()
    return accelerator.reduce(step_loss, "mean").item()


def apply_update(run: Run, loss_value: float) -> tuple[Any, float]:
    """Clip, step the optimizer and schedule; (grad norm, the lr used). Stops on a non-finite loss or weights."""
    step = run.state.step + 1
    if not math.isfinite(loss_value):
        diverged(run.run_dir, step, f"loss {loss_value}")
    # Clipping at +inf leaves gradients untouched and still returns the norm for the log. The norm is global:
    # under FSDP2 Accelerate reduces the DTensor shards' norms; DeepSpeed clipped inside its engine step
    # (config gradient_clipping) and this returns the global norm it computed.
    grad_norm = run.accelerator.clip_grad_norm_(run.params, run.cfg.train.max_grad_norm or float("inf"))
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    # A huge update can overflow the weights while this step's loss was still finite; catch it here so
    # no checkpoint and no final adapter ever holds inf/nan.
    if not all_finite(run.params, run.accelerator):
        diverged(run.run_dir, step, f"loss {loss_value}, adapter weights inf/nan after the update")
    return grad_norm, lr


def advance(run: Run, host: list[dict], clock: tuple[float, float, int]) -> float:
    """Count the finished step in run.state (step, data position, tokens, time); returns tokens per second."""
    import torch

    state, accelerator, accum = run.state, run.accelerator, run.cfg.train.grad_accum_steps
    start, elapsed0, tokens0 = clock
    n_tokens = sum(batch_tokens(b) for b in host)  # host copies: no device sync
    if accelerator.num_processes > 1:
        n_tokens = int(accelerator.reduce(torch.tensor(n_tokens, device=accelerator.device), "sum").item())
    state.tokens_seen += n_tokens
    state.step += 1
    state.micro_batches_seen += accum
    state.epoch, state.batch_in_epoch = divmod(state.micro_batches_seen, run.data.per_epoch)
    now = time.perf_counter() - start
    state.elapsed_s = elapsed0 + now
    return (state.tokens_seen - tokens0) / max(now, 1e-9)


def log_step(run: Run, loss: float, lr: float, grad_norm: float, tok_s: float, val: dict | None) -> None:
    """One metrics.jsonl record per logged or validated step (validated ones carry val_loss), and trackers."""
    t, state = run.cfg.train, run.state
    if not (state.step % t.log_every == 0 or state.step == run.data.total_steps or val is not None):
        return
    record = {
        "step": state.step,
        "epoch": round(state.micro_batches_seen / run.data.per_epoch, 4),
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": round(tok_s, 1),
        "tokens": state.tokens_seen,
        "elapsed_s": round(state.elapsed_s, 2),
        **(val or {}),
    }
    if run.main:
        with open(run.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
    if t.report_to:
        run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)


def all_finite(params: list, accelerator: Any) -> bool:
    """Whether every trainable value is finite, on every process.

    One fused (foreach) reduction: the largest |value| over all tensors is finite exactly when every value is (nan
    propagates through max, inf stays inf). It replaces isfinite().all() per tensor, two dispatched ops (two kernel
    launches on a GPU) for each of ABBA's four factors per layer, 840 tensors on SmolLM2, every step. Empty
    tensors (ZeRO-3 shards) hold nothing to check, and the inf-norm refuses them.
    """
    import torch
    from torch.nn.utils import get_total_norm

    local = [_local(p.detach()) for p in params if p.numel()]
    local = [p for p in local if p.numel()]
    with torch.no_grad():
        peak = get_total_norm(local, float("inf")) if local else torch.zeros((), device=accelerator.device)
        ok = torch.isfinite(peak).to(torch.int32)
    if accelerator.num_processes > 1:
        ok = accelerator.reduce(ok, "min")
    return bool(ok.item())


def _local(tensor: Any) -> Any:
    """This process's shard of an FSDP2 DTensor parameter (a plain tensor as it is)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def diverged(run_dir: Path, step: int, what: str) -> None:
    """Stop on divergence: name the step and the last good checkpoint (written before it, and finite)."""
    from abba_cli.run.layout import last_finite_checkpoint

    last = last_finite_checkpoint(run_dir, before_step=step)
    where = (
        f"the last good checkpoint is {last} (resume from it: {resume_hint(run_dir)})"
        if last
        else "no finite checkpoint was saved before it"
    )
    raise UserError(
        f"training stopped: non-finite loss or weights at step {step}; {what}; {where}; "
        "try a lower train.lr, a train.max_grad_norm, or train.mixed_precision=no"
    )
