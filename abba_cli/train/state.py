"""A run's resumable state: restoring it on --resume (checkpoint, same-data check, an extended schedule),
writing checkpoints when due or on a stop signal, and the trainable tensors they hold (gathered whole under
FSDP and DeepSpeed).
"""

from __future__ import annotations

import errno
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from abba_cli.errors import UserError
from abba_cli.run.layout import ADAPTER_WEIGHTS, CHECKPOINTS, METRICS_FILE, latest_checkpoint
from abba_cli.run.training_dir import resume_hint, truncate_metrics
from abba_cli.train import sharded
from abba_cli.train.context import Run
from abba_cli.train.early_stopping import best_weights_to_checkpoint, restore_best, restored_tracker
from abba_cli.util.signals import TrainingStopped, signal_name


def restore(run: Run, resume_from: Path | None) -> dict | None:
    """Set run.state (from the checkpoint when resuming) and return this process's RNG state to restore."""
    from abba_cli.train import checkpoint as ckpt

    run.state = ckpt.TrainState(
        step=0, epoch=0, batch_in_epoch=0, micro_batches_seen=0, elapsed_s=0.0, tokens_seen=0
    )
    rng = None
    if resume_from is not None:
        run.state, tensors, opt_state, sched_state, rng_states = ckpt.load_checkpoint(resume_from)
        _check_finite(run, resume_from, tensors)
        _check_same_data(run, resume_from)
        check_trainable_keys(run.accelerator.unwrap_model(run.model), tensors, resume_from, run.full)
        if run.deepspeed:
            # The engine restores its fp32 master weights (the same values as the adapter file) and its shards.
            engine_dir = resume_from / ckpt.ENGINE_DIR
            if not engine_dir.is_dir():
                raise UserError(
                    f"{resume_from}: no DeepSpeed engine state ({ckpt.ENGINE_DIR}/); it was written by another "
                    f"distributed.strategy than {run.strategy}; resume with that strategy"
                )
            sharded.load_engine(run, engine_dir)
        else:
            if opt_state is None:
                raise UserError(
                    f"{resume_from}: written by a DeepSpeed run (its optimizer state is in {ckpt.ENGINE_DIR}/); "
                    f"resume with that distributed.strategy, not {run.strategy}"
                )
            sharded.load_trainable(run, tensors)
            sharded.load_optimizer_state(run, opt_state)
        run.scheduler.load_state_dict(sched_state)
        if run.extends_from is not None:
            _extend_schedule(run)
        world, rank = run.accelerator.num_processes, run.accelerator.process_index
        # One RNG state per process, and the data position counts global micro-batches of this many processes.
        if len(rng_states) != world:
            raise UserError(
                f"{resume_from}: saved by {len(rng_states)} process(es), resumed with {world}; "
                "resume with the same number of processes"
            )
        rng = rng_states[rank]
        if run.main:
            print(
                f"resuming from {resume_from} (step {run.state.step}/{run.data.total_steps})", file=sys.stderr
            )
    run.state.data_sha256 = run.data.sha256
    metrics = run.run_dir / METRICS_FILE
    if run.main:  # only the main process writes the metrics, the validation summary and RUN_DIR/best
        truncate_metrics(metrics, run.state.step)
        restore_best(run, resume_from)
    # Every process follows val_loss: they must agree on an early stop.
    run.val_tracker = restored_tracker(
        run.state.val_tracker, metrics, run.state.step, run.cfg.train.early_stopping_min_delta
    )
    return rng


def _check_finite(run: Run, checkpoint: Path, tensors: dict) -> None:
    """A checkpoint holding inf/nan would only diverge again a few steps later, blamed on that step: name it
    now, before any step, with the checkpoint to resume from instead."""
    import torch

    from abba_cli.run.layout import last_finite_checkpoint

    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not bad:
        return
    step = run.state.step
    older = last_finite_checkpoint(run.run_dir, before_step=step)
    fix = (
        f"the last finite checkpoint is {older}: delete the newer ones ({checkpoint}) and resume"
        if older
        else "no earlier finite checkpoint exists: start a new run"
    )
    raise UserError(
        f"--resume: {checkpoint / ADAPTER_WEIGHTS} holds non-finite (inf/nan) values in {len(bad)} tensor(s), "
        f"e.g. {bad[0]}; {fix}"
    )


def _check_same_data(run: Run, checkpoint: Path) -> None:
    saved = run.state.data_sha256
    if saved is not None and saved != run.data.sha256:
        d = run.cfg.data
        source = f"data.path {d.path}" if d.path else f"data.recipe {d.recipe}"
        raise UserError(
            f"--resume: the training examples of {source} changed since {checkpoint} was written (sha256 "
            f"{run.data.sha256[:12]}, was {saved[:12]}); an exact resume needs the same data: restore it, or "
            "start a new run"
        )


def _extend_schedule(run: Run) -> None:
    """Continue an extended run on the schedule recomputed for its new total (warmup and decay over M steps):
    from the checkpoint's step on, the learning rate is what an M-step run would use there."""
    sched, step = run.scheduler, run.scheduler.last_epoch
    for group, base, fn in zip(run.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        group["lr"] = base * fn(step)
    sched._last_lr = [group["lr"] for group in run.optimizer.param_groups]
    if run.main:
        print(
            f"extending the run from {run.extends_from} to {run.data.total_steps} steps (from step "
            f"{run.state.step}); the learning-rate schedule is recomputed for {run.data.total_steps} steps",
            file=sys.stderr,
        )


def checkpoint_or_stop(run: Run) -> None:
    """Checkpoint when due; after a SIGINT/SIGTERM, checkpoint (if not just done) and raise TrainingStopped."""

    t, step, total = run.cfg.train, run.state.step, run.data.total_steps
    saved = bool(t.save_every) and (step % t.save_every == 0 or step == total)
    if saved:
        write_checkpoint(run)
    if step < total and run.stop_requested():
        path = write_checkpoint(run) if not saved else latest_checkpoint(run.run_dir)
        stop = run.stop
        signum = stop.signum if stop is not None and stop.signum is not None else signal.SIGTERM
        raise TrainingStopped(
            f"stopped by {signal_name(signum)} after step {step}/{total}; checkpoint {path}; "
            f"resume with: {resume_hint(run.run_dir)}",
            signum,
        )


def final_checkpoint(run: Run) -> Path | None:
    """The checkpoint of the current step, written unless it already was (a collective)."""
    latest = latest_checkpoint(run.run_dir)
    if latest is not None and latest.name == f"step-{run.state.step}":
        return latest
    return write_checkpoint(run)


def write_checkpoint(run: Run) -> Path | None:
    """Write checkpoints/step-N (main process); a collective, so every process calls it."""
    from accelerate.utils import gather_object

    from abba_cli.train import checkpoint as ckpt

    world = run.accelerator.num_processes
    run.state.val_tracker = run.val_tracker.state()
    rngs = gather_object([ckpt.rng_state()]) if world > 1 else [ckpt.rng_state()]
    tensors = gathered_trainable_state(run.accelerator, run.model, run.full)
    target = run.run_dir / CHECKPOINTS / f"step-{run.state.step}"
    with disk_full_is_a_user_error(f"the optimizer state of checkpoint {target}", run.run_dir):
        optimizer_state = sharded.optimizer_state_to_save(run)
        engine_dir = None
        if run.deepspeed:
            # Every process writes its shard into one staging directory, moved into step-N when complete.
            staging = run.run_dir / CHECKPOINTS / f".step-{run.state.step}.engine.partial"
            sharded.save_engine(run, staging)
            engine_dir = staging / sharded.ENGINE_TAG
            run.accelerator.wait_for_everyone()
    path = None
    if run.main:
        with disk_full_is_a_user_error(f"checkpoint {target}", run.run_dir):
            path = ckpt.save_checkpoint(
                run.run_dir,
                run.state,
                tensors,
                optimizer_state,
                run.scheduler.state_dict(),
                rngs,
                run.cfg.train.save_total_limit,
                engine_dir=engine_dir,
                best_weights=best_weights_to_checkpoint(run),
            )
    run.accelerator.wait_for_everyone()
    return path


@contextmanager
def disk_full_is_a_user_error(what: str, run_dir: Path) -> Iterator[None]:
    """A full disk while writing `what`: one line naming it; the writes are atomic, so what was there stays."""

    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        last = latest_checkpoint(run_dir)
        kept = f"the last checkpoint {last} is intact; " if last else ""
        raise UserError(
            f"no space left on device writing {what} ({err.strerror}); {kept}free space, then resume: "
            f"{resume_hint(run_dir)}"
        ) from None


def trainable_state_dict(model: Any, full: bool) -> dict:
    """What a checkpoint stores: the adapter factors, or every (deduplicated) parameter for full fine-tuning."""
    if full:
        return {name: p.detach() for name, p in model.named_parameters()}
    from abba_cli.adapters import adapter_state_dict

    return adapter_state_dict(model)


def gathered_trainable_state(accelerator: Any, model: Any, full: bool) -> dict | None:
    """The trainable tensors to save, whole. Every process must call it; the main process gets the tensors.

    Under FSDP and DeepSpeed the local parameters are shards (ZeRO-3: empty), so the full state dict is gathered
    with `accelerator.get_state_dict` (a collective) and the trainable keys are kept.
    """
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    named = trainable_state_dict(unwrapped, full)
    if accelerator.distributed_type == DistributedType.FSDP:
        whole = sharded.gather_full("fsdp", model, named)
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        whole = sharded.gather_full("zero3" if stage == 3 else "zero2", model, named)
    else:
        return named
    return whole if accelerator.is_main_process else None


def check_trainable_keys(model: Any, tensors: dict, source: Path, full: bool = False) -> None:
    expected = trainable_state_dict(model, full)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{source}: adapter tensors do not match this config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
