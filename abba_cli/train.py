"""`abba train` and `abba validate`: one Accelerate training loop, written out in one place.

`run_training` is a short sequence of named setup steps (output_dir checked -> accelerator + seed -> run
directory locked and checked (rundir.py) -> base model and adapters -> data -> optimizer + schedule -> run directory
files -> resume state), one loop (`_fit`, whose body is named steps too) and `_finish` (final adapter + latest-run
marker).

Exact resume (bitwise on CPU) rests on three choices:
- the data order of epoch e is a permutation drawn from its own generator seeded by (train.seed, e), so it
  never depends on how much global RNG was consumed before, and resuming means skipping micro-batches;
- no DataLoader iterator is created (creating one draws from the global torch RNG); batches are collated
  directly from the tokenized dataset;
- a checkpoint holds adapter weights, optimizer, scheduler, every RNG state and the data position, and the RNG
  states are restored last, just before the loop continues.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abba_cli.config import RunConfig, dump_config
from abba_cli.errors import UserError
from abba_cli.fsutil import atomic_write_text
from abba_cli.rundir import (
    METRICS_FILE,
    Resume,
    RunLock,
    check_output_dir,
    check_run_dir,
    resume_hint,
    truncate_metrics,
)
from abba_cli.runs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG_FILE, FULL_MODEL_DIR
from abba_cli.signals import GracefulStop, TrainingStopped, signal_name

VAL_SUMMARY_FILE = "val_summary.json"


# ----------------------------------------------------------------------------------------------- validate


def validate_run(cfg: RunConfig, config_path: str | Path) -> None:
    """Print the resolved config and the trainable-parameter summary.

    The model is built from its config on the meta device: no weights are read, so validating a 9B config is
    instant and needs no GPU (shapes, target matching and rank limits are all checked the same way).
    """
    from abba_cli import data
    from abba_cli.adapters import inject_adapters, trainable_summary
    from abba_cli.adapters.abba import describe_paths

    print(f"# resolved config from {config_path}")
    print(dump_config(cfg), end="")
    _, examples, _ = data.load_train_examples(
        cfg.data
    )  # every row read and checked before the model is built
    model, tokenizer = _load_model(cfg, empty_weights=True)
    if cfg.adapter.type == "full":
        model.requires_grad_(True)
        print(f"# full fine-tuning of every parameter of {cfg.model.name_or_path}")
    else:
        adapted = inject_adapters(model, cfg.adapter, seed=cfg.train.seed, init=False)
        print(f"# {cfg.adapter.type} adapters on {len(adapted)} linear layers of {cfg.model.name_or_path}")
    print(trainable_summary(model))
    plan = describe_paths(model, cfg.train.micro_batch_size * cfg.data.max_seq_len)
    if plan:
        print(f"{plan} (full-length micro-batch; `auto` re-decides per batch)")
    print(data.check_examples(cfg.data, examples, tokenizer, cfg.model.name_or_path))


# ----------------------------------------------------------------------------------------------- train


@dataclass
class _Data:
    """The tokenized training and validation sets and the step counts derived from them."""

    train: Any
    val: Any  # None without data.val_samples / data.val_path
    collate: Callable
    per_epoch: int  # micro-batches per epoch (global: each holds micro_batch_size examples per process)
    total_steps: int
    warmup: int
    sha256: str  # of the training examples' fields, in order: --resume refuses changed data


@dataclass
class _Run:
    """Everything the loop works on, built by the setup steps of `run_training`."""

    cfg: RunConfig
    run_dir: Path
    accelerator: Any
    model: Any
    tokenizer: Any
    params: list
    data: _Data
    optimizer: Any
    scheduler: Any
    state: Any = None  # checkpoint.TrainState, set by _restore
    extends_from: int | None = None  # the old total of steps when --resume extends a run
    best_val: dict | None = None  # {"best_val_loss", "best_val_step"} so far

    @property
    def full(self) -> bool:
        return self.cfg.adapter.type == "full"

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def run_training(
    cfg: RunConfig, config_path: str | Path, resume: bool = False, dry_run: bool = False
) -> Path | None:
    """Train per `cfg`; returns the run directory (None for a dry run)."""
    from abba_cli import checkpoint as ckpt

    run_dir = Path(cfg.output_dir)
    check_output_dir(run_dir)
    accelerator = _setup_accelerator(cfg, run_dir)
    # The main process locks the run directory for the whole run: a second `abba train` on it fails at once.
    with RunLock(run_dir) if accelerator.is_main_process and not dry_run else nullcontext():
        resume_plan = None if dry_run else check_run_dir(cfg.model_dump(mode="json"), run_dir, resume)
        model, tokenizer, params = _setup_model(cfg)
        data = _setup_data(cfg, tokenizer, accelerator)
        if accelerator.is_main_process:
            _print_plan(cfg, model, data, accelerator.num_processes)
        if dry_run:
            print("dry run: nothing trained, nothing written")
            return None
        optimizer, scheduler = _setup_optimizer(cfg, params, data)
        model, optimizer = accelerator.prepare(model, optimizer)
        run = _Run(cfg, run_dir, accelerator, model, tokenizer, params, data, optimizer, scheduler)
        run.extends_from = _extension(cfg, resume_plan, data)
        _start_run_dir(run, fresh=resume_plan is None)
        rng = _restore(run, resume_plan.checkpoint if resume_plan else None)
        if rng is not None:
            ckpt.set_rng_state(rng)  # last, so nothing between here and the first batch draws from it
        # SIGINT/SIGTERM do not kill the loop mid-step: it finishes the step, checkpoints, says how to resume.
        with GracefulStop() as stop:
            _fit(run, stop)
        _finish(run)
    return run_dir


def _setup_accelerator(cfg: RunConfig, run_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = cfg.train
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, log_with=_trackers(t.report_to), project_dir=str(run_dir)
    )
    # Adapter init (SVD, Kaiming) and dropout draw from these generators: one seed makes the run repeatable.
    set_seed(t.seed)
    return accelerator


def _setup_model(cfg: RunConfig) -> tuple[Any, Any, list]:
    """(model with its adapters, tokenizer, trainable parameters)."""
    from abba_cli.adapters import inject_adapters

    model, tokenizer = _load_model(cfg)
    tokenizer.padding_side = "right"  # training pads on the right; evaluation sets its own side
    if cfg.adapter.type == "full":
        # No adapter: every weight of the base trains (keep model.dtype float32 for fp32 master weights).
        model.requires_grad_(True)
    else:
        inject_adapters(model, cfg.adapter, seed=cfg.train.seed)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs; input grads keep the graph connected anyway.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError(
            f"adapter.target_modules {cfg.adapter.target_modules}: no trainable parameters were created"
        )
    return model, tokenizer, params


def _setup_data(cfg: RunConfig, tokenizer: Any, accelerator: Any) -> _Data:
    t = cfg.train
    dataset, val_dataset, collate, sha256 = _build_dataset(cfg, tokenizer, accelerator.main_process_first)
    per_epoch = _micro_batches_per_epoch(len(dataset), t.micro_batch_size, accelerator.num_processes)
    total_steps = _total_steps(t.max_steps, t.epochs, per_epoch, t.grad_accum_steps)
    warmup = math.ceil(t.warmup_ratio * total_steps)
    return _Data(dataset, val_dataset, collate, per_epoch, total_steps, warmup, sha256)


def _extension(cfg: RunConfig, resume: Resume | None, data: _Data) -> int | None:
    """The run's old total of steps when this --resume extends it (a larger train.max_steps / epochs)."""
    if resume is None or resume.extends is None:
        return None
    saved, t = resume.extends, cfg.train
    old = _total_steps(saved.get("max_steps"), saved.get("epochs", 1.0), data.per_epoch, t.grad_accum_steps)
    if data.total_steps < old:
        raise UserError(
            f"--resume: train.max_steps/train.epochs give {data.total_steps} steps, fewer than the run's {old}; "
            "a run can be extended to a larger total, not shortened (its checkpoints are kept: evaluate one)"
        )
    return old if data.total_steps > old else None


def _print_plan(cfg: RunConfig, model: Any, data: _Data, world: int) -> None:
    from abba_cli.adapters import trainable_summary
    from abba_cli.adapters.abba import describe_paths

    t = cfg.train
    print(trainable_summary(model), file=sys.stderr)
    plan = describe_paths(model, t.micro_batch_size * cfg.data.max_seq_len)
    if plan:
        print(f"{plan} (full-length micro-batch; `auto` re-decides per batch)", file=sys.stderr)
    print(
        f"{len(data.train)} training examples, {data.per_epoch} micro-batches of {t.micro_batch_size} per epoch "
        f"x {world} process(es); {data.total_steps} optimizer steps of {t.grad_accum_steps} micro-batches "
        f"({data.total_steps * t.grad_accum_steps / data.per_epoch:.2f} epochs), {data.warmup} warmup steps",
        file=sys.stderr,
    )
    if data.val is not None:
        print(_describe_validation(cfg, len(data.val)), file=sys.stderr)


def _setup_optimizer(cfg: RunConfig, params: list, data: _Data) -> tuple[Any, Any]:
    import torch
    from transformers import get_scheduler

    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    # The scheduler stays unprepared: AcceleratedScheduler would step once per process, and total_steps is
    # already counted per process here.
    scheduler = get_scheduler(
        "constant_with_warmup" if t.scheduler == "constant" else t.scheduler,
        optimizer,
        num_warmup_steps=data.warmup,
        num_training_steps=data.total_steps,
    )
    return optimizer, scheduler


def _start_run_dir(run: _Run, fresh: bool) -> None:
    if run.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        if fresh or run.extends_from is not None:  # an extended run's config states its new total
            atomic_write_text(run.run_dir / CONFIG_FILE, dump_config(run.cfg))
    if run.cfg.train.report_to:
        run.accelerator.init_trackers("abba", config=_flatten(run.cfg.model_dump(mode="json")))


def _restore(run: _Run, resume_from: Path | None) -> dict | None:
    """Set run.state (from the checkpoint when resuming) and return this process's RNG state to restore."""
    from abba_cli import checkpoint as ckpt

    run.state = ckpt.TrainState(
        step=0, epoch=0, batch_in_epoch=0, micro_batches_seen=0, elapsed_s=0.0, tokens_seen=0
    )
    rng = None
    if resume_from is not None:
        run.state, tensors, opt_state, sched_state, rng_states = ckpt.load_checkpoint(resume_from)
        _check_same_data(run, resume_from)
        _load_adapter_tensors(run.accelerator.unwrap_model(run.model), tensors, resume_from, run.full)
        run.optimizer.load_state_dict(opt_state)
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
    if run.main:  # only the main process writes the metrics and the validation summary
        metrics = run.run_dir / METRICS_FILE
        truncate_metrics(metrics, run.state.step)
        run.best_val = _best_val(metrics) if run.data.val is not None else None
    return rng


def _check_same_data(run: _Run, checkpoint: Path) -> None:
    saved = run.state.data_sha256
    if saved is not None and saved != run.data.sha256:
        d = run.cfg.data
        source = f"data.path {d.path}" if d.path else f"data.recipe {d.recipe}"
        raise UserError(
            f"--resume: the training examples of {source} changed since {checkpoint} was written (sha256 "
            f"{run.data.sha256[:12]}, was {saved[:12]}); an exact resume needs the same data: restore it, or "
            "start a new run"
        )


def _extend_schedule(run: _Run) -> None:
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


def _fit(run: _Run, stop: GracefulStop | None = None) -> None:
    """The optimisation loop: accumulate micro-batches, clip, step, validate, log, checkpoint; stop on a
    non-finite loss, or after the current step (with a checkpoint) when `stop` caught SIGINT/SIGTERM."""
    from tqdm.auto import tqdm

    t, state, accelerator = run.cfg.train, run.state, run.accelerator
    batches = _batch_stream(
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
            host = [
                run.data.collate([run.data.train[i] for i in idx])
                for _, _, idx in (next(batches) for _ in range(t.grad_accum_steps))
            ]
            micro = [_to_device(b, accelerator.device) for b in host]
            loss_value = _accumulate_gradients(run, host, micro)
            grad_norm, lr = _apply_update(run, loss_value)
            tok_s = _advance(run, host, clock)
            bar.update(1)
            val = _validate_if_due(run, bar)
            postfix = dict(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            if run.best_val is not None:
                postfix["best_val"] = f"{run.best_val['best_val_loss']:.4f}"
            bar.set_postfix(postfix)
            _log_step(run, loss_value, lr, float(grad_norm), tok_s, val)
            _checkpoint_or_stop(run, stop)
    finally:
        bar.close()


def _accumulate_gradients(run: _Run, host: list[dict], micro: list[dict]) -> float:
    """Forward and backward over one optimizer step's micro-batches; returns the step's loss (all processes).

    Normalised by the target tokens of the whole optimizer step, so accumulation equals one big batch. Across
    processes too: DDP averages gradients over processes, so each process scales its token sum by
    world / (targets of all processes); a global batch then trains exactly as one process would.
    """
    import torch

    accelerator, world = run.accelerator, run.accelerator.num_processes
    # Counted on the host copies (`micro` is them on the device): int() of a device tensor is a host sync (on a
    # GPU, one per micro-batch, each waiting for the queue to drain).
    all_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in host)
    if world > 1:
        all_targets = int(
            accelerator.reduce(torch.tensor(all_targets, device=accelerator.device), "sum").item()
        )
    n_targets = max(all_targets, 1) / world
    step_loss = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1
        with nullcontext() if sync else accelerator.no_sync(run.model):
            logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = _target_loss_sum(logits, batch["labels"]) / n_targets
            accelerator.backward(loss)
        step_loss += loss.detach()
    return accelerator.reduce(step_loss, "mean").item()


def _apply_update(run: _Run, loss_value: float) -> tuple[Any, float]:
    """Clip, step the optimizer and schedule; (grad norm, the lr used). Stops on a non-finite loss or weights."""
    step = run.state.step + 1
    if not math.isfinite(loss_value):
        _diverged(run.run_dir, step, f"loss {loss_value}")
    # Clipping at +inf leaves gradients untouched and still returns the norm for the log.
    grad_norm = run.accelerator.clip_grad_norm_(run.params, run.cfg.train.max_grad_norm or float("inf"))
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    # A huge update can overflow the weights while this step's loss was still finite; catch it here so
    # no checkpoint and no final adapter ever holds inf/nan.
    if not _all_finite(run.params, run.accelerator):
        _diverged(run.run_dir, step, f"loss {loss_value}, adapter weights inf/nan after the update")
    return grad_norm, lr


def _advance(run: _Run, host: list[dict], clock: tuple[float, float, int]) -> float:
    """Count the finished step in run.state (step, data position, tokens, time); returns tokens per second."""
    import torch

    state, accelerator, accum = run.state, run.accelerator, run.cfg.train.grad_accum_steps
    start, elapsed0, tokens0 = clock
    n_tokens = sum(int(b["attention_mask"].sum()) for b in host)  # host copies: no device sync
    if accelerator.num_processes > 1:
        n_tokens = int(accelerator.reduce(torch.tensor(n_tokens, device=accelerator.device), "sum").item())
    state.tokens_seen += n_tokens
    state.step += 1
    state.micro_batches_seen += accum
    state.epoch, state.batch_in_epoch = divmod(state.micro_batches_seen, run.data.per_epoch)
    now = time.perf_counter() - start
    state.elapsed_s = elapsed0 + now
    return (state.tokens_seen - tokens0) / max(now, 1e-9)


def _validate_if_due(run: _Run, bar: Any) -> dict | None:
    """Every train.eval_every steps and at the last: val_loss, the best so far, RUN_DIR/val_summary.json."""
    every, step = run.cfg.train.eval_every, run.state.step
    if run.data.val is None or not (step == run.data.total_steps or (every and step % every == 0)):
        return None
    val = _validation_loss(
        run.accelerator, run.model, run.data.val, run.data.collate, run.cfg.train.micro_batch_size
    )
    if run.best_val is None or val["val_loss"] < run.best_val["best_val_loss"]:
        run.best_val = {"best_val_loss": val["val_loss"], "best_val_step": step}
    if run.main:
        _write_val_summary(run.run_dir, step, val, run.best_val)
        bar.write(
            f"step {step}: val_loss {val['val_loss']:.4f} "
            f"(best {run.best_val['best_val_loss']:.4f} at step {run.best_val['best_val_step']})",
            file=sys.stderr,
        )
    return val


def _log_step(run: _Run, loss: float, lr: float, grad_norm: float, tok_s: float, val: dict | None) -> None:
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


def _checkpoint_or_stop(run: _Run, stop: GracefulStop | None) -> None:
    """Checkpoint when due; after a SIGINT/SIGTERM, checkpoint (if not just done) and raise TrainingStopped."""
    from abba_cli.checkpoint import latest_checkpoint

    t, step, total = run.cfg.train, run.state.step, run.data.total_steps
    saved = bool(t.save_every) and (step % t.save_every == 0 or step == total)
    if saved:
        _save_checkpoint(run)
    if step < total and _stop_requested(stop, run.accelerator):
        path = _save_checkpoint(run) if not saved else latest_checkpoint(run.run_dir)
        signum = stop.signum if stop is not None and stop.signum is not None else signal.SIGTERM
        raise TrainingStopped(
            f"stopped by {signal_name(signum)} after step {step}/{total}; checkpoint {path}; "
            f"resume with: {resume_hint(run.run_dir)}",
            signum,
        )


def _save_checkpoint(run: _Run) -> Path | None:
    """Write checkpoints/step-N (main process); a collective, so every process calls it."""
    from accelerate.utils import gather_object

    from abba_cli import checkpoint as ckpt

    world = run.accelerator.num_processes
    rngs = gather_object([ckpt.rng_state()]) if world > 1 else [ckpt.rng_state()]
    tensors = gathered_trainable_state(run.accelerator, run.model, run.full)
    path = None
    if run.main:
        target = run.run_dir / ckpt.CHECKPOINTS / f"step-{run.state.step}"
        with _disk_full_is_a_user_error(f"checkpoint {target}", run.run_dir):
            path = ckpt.save_checkpoint(
                run.run_dir,
                run.state,
                tensors,
                run.optimizer.state_dict(),
                run.scheduler.state_dict(),
                rngs,
                run.cfg.train.save_total_limit,
            )
    run.accelerator.wait_for_everyone()
    return path


@contextmanager
def _disk_full_is_a_user_error(what: str, run_dir: Path) -> Iterator[None]:
    """A full disk while writing `what`: one line naming it; the writes are atomic, so what was there stays."""
    from abba_cli.checkpoint import latest_checkpoint

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


def _finish(run: _Run) -> None:
    """Save the final adapter (or full model), record the latest run, say where everything is."""
    from abba_cli.adapters import save_adapter
    from abba_cli.runs import record_latest

    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    final_tensors = None if run.full else gathered_trainable_state(accelerator, run.model, run.full)
    if run.main:
        unwrapped = accelerator.unwrap_model(run.model)
        with _disk_full_is_a_user_error(f"the final {'model' if run.full else 'adapter'}", run.run_dir):
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


def _print_outputs(run: _Run) -> None:
    from abba_cli.checkpoint import CHECKPOINTS

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
    if run.cfg.train.save_every:
        print(f"  checkpoints: {run_dir / CHECKPOINTS}")
    if run.full:
        print("next: abba eval --task <task>   (defaults to this run)")
    else:
        print("next: abba eval --task <task>   |   abba merge --out <dir>   (both default to this run)")


def _validation_loss(
    accelerator: Any, model: Any, val_dataset: Any, collate: Callable, micro_batch_size: int
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
                batch = _to_device(collate([val_dataset[i] for i in idx or [0]]), accelerator.device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                if idx:
                    loss_sum += float(_target_loss_sum(logits, batch["labels"]))
                    targets += int((batch["labels"][:, 1:] != -100).sum())
    finally:
        model.train()
    if world > 1:
        totals = accelerator.reduce(
            torch.tensor([loss_sum, targets], dtype=torch.float64, device=accelerator.device), "sum"
        )
        loss_sum, targets = float(totals[0]), int(totals[1])
    return {"val_loss": loss_sum / max(targets, 1), "val_tokens": targets}


def _best_val(metrics: Path) -> dict[str, float | int] | None:
    """The best val_loss logged so far (on resume, metrics.jsonl is already cut back to the checkpoint)."""
    if not metrics.is_file():
        return None
    best = None
    for line in metrics.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "val_loss" in record and (best is None or record["val_loss"] < best["best_val_loss"]):
            best = {"best_val_loss": record["val_loss"], "best_val_step": record["step"]}
    return best


def _write_val_summary(run_dir: Path, step: int, val: dict, best: dict) -> None:
    summary = {
        **best,
        "last_val_loss": val["val_loss"],
        "last_val_step": step,
        "val_tokens": val["val_tokens"],
    }
    atomic_write_text(run_dir / VAL_SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def _describe_validation(cfg: RunConfig, n: int) -> str:
    d, every = cfg.data, cfg.train.eval_every
    source = "held out of the training source (data.val_samples)" if d.val_samples else f"from {d.val_path}"
    when = (
        f"every {every} steps and at the end"
        if every
        else "at the end only (set train.eval_every for a curve)"
    )
    return f"validation: {n} examples {source}; val_loss {when}"


def _all_finite(params: list, accelerator: Any) -> bool:
    """Whether every trainable value is finite, on every process.

    One fused (foreach) reduction: the largest |value| over all tensors is finite exactly when every value is (nan
    propagates through max, inf stays inf). It replaces isfinite().all() per tensor, two dispatched ops (two kernel
    launches on a GPU) for each of ABBA's four factors per layer, 840 tensors on SmolLM2, every step. Empty
    tensors (ZeRO-3 shards) hold nothing to check, and the inf-norm refuses them.
    """
    import torch
    from torch.nn.utils import get_total_norm

    local = [p.detach() for p in params if p.numel()]
    with torch.no_grad():
        peak = get_total_norm(local, float("inf")) if local else torch.zeros((), device=accelerator.device)
        ok = torch.isfinite(peak).to(torch.int32)
    if accelerator.num_processes > 1:
        ok = accelerator.reduce(ok, "min")
    return bool(ok.item())


def _diverged(run_dir: Path, step: int, what: str) -> None:
    """Stop on divergence: name the step and the last good checkpoint (written before it, and finite)."""
    from abba_cli.checkpoint import last_finite_checkpoint

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


def _stop_requested(stop: GracefulStop | None, accelerator: Any) -> bool:
    """Whether any process caught a stop signal; every process must agree, or the others hang in a collective."""
    requested = stop is not None and stop.requested
    if accelerator.num_processes == 1:
        return requested
    import torch

    flag = torch.tensor(int(requested), device=accelerator.device)
    return bool(accelerator.reduce(flag, "max").item())


# ----------------------------------------------------------------------------------------------- helpers


def _load_model(cfg: RunConfig, empty_weights: bool = False) -> tuple[Any, Any]:
    from abba_cli.models import load_base

    m = cfg.model
    return load_base(
        m.name_or_path,
        m.dtype,
        trust_remote_code=m.trust_remote_code,
        revision=m.revision,
        attn_implementation=m.attn_implementation,
        empty_weights=empty_weights,
        quantization=m.quantization,
        double_quant=m.double_quant,
    )


def _build_dataset(
    cfg: RunConfig, tokenizer: Any, main_process_first: Any = None
) -> tuple[Any, Any, Callable, str]:
    """(training dataset, validation dataset or None, collator). data.val_samples examples are held out of the
    training source before the training subset is drawn (recipes.load_split), so the two never overlap."""
    from abba_cli import data

    d = cfg.data
    dataset, val_dataset = data.prepare_train_dataset(
        d, tokenizer, cfg.model.name_or_path, main_process_first
    )
    if len(dataset) == 0:
        raise UserError(
            f"data.recipe {d.recipe!r}: no training examples left (check data.num_samples/skip_samples)"
        )
    return dataset, val_dataset, data.make_collator(tokenizer), _examples_sha256(dataset)


def _examples_sha256(dataset: Any) -> str:
    """A content hash of the tokenized training examples (ids and labels, in order), checked on --resume."""
    digest = hashlib.sha256()
    for column in ("input_ids", "labels"):
        digest.update(json.dumps(list(dataset[column])).encode())
    return digest.hexdigest()


def _micro_batches_per_epoch(n: int, micro_batch_size: int, world: int) -> int:
    return math.ceil(n / (micro_batch_size * world))


def _total_steps(max_steps: int | None, epochs: float, per_epoch: int, accum: int) -> int:
    if max_steps is not None:
        return max_steps
    # Steps consume micro-batches from one continuous stream of epochs, so the last step may reach a few
    # micro-batches into the next (reshuffled) epoch rather than dropping examples.
    return max(1, math.ceil(epochs * per_epoch / accum))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation drawn from its own generator, seeded by (seed, epoch)."""
    import torch

    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def _batch_stream(
    n: int,
    micro_batch_size: int,
    seed: int,
    world: int,
    rank: int,
    skip: int,
    per_epoch: int,
    lengths: list[int] | None = None,
) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, batch index, example indices of this process) from micro-batch number `skip` onward, forever.

    A global micro-batch holds micro_batch_size examples per process; with several processes the epoch's order
    wraps around to fill the last one, so every process always gets a full batch (as DistributedSampler does).
    """
    epoch, batch = divmod(skip, per_epoch)
    size = micro_batch_size * world
    while True:
        if lengths is None:
            order = epoch_order(n, seed, epoch)
        else:  # data.group_by_length
            from abba_cli.data import length_grouped_order

            order = length_grouped_order(lengths, seed, epoch, size)
        if world > 1:
            order = (order * math.ceil(per_epoch * size / n + 1))[: per_epoch * size]
        for b in range(batch, per_epoch):
            chunk = order[b * size : (b + 1) * size]
            yield epoch, b, chunk[rank * micro_batch_size : (rank + 1) * micro_batch_size]
        epoch, batch = epoch + 1, 0


def _target_loss_sum(logits: Any, labels: Any) -> Any:
    """Sum of next-token cross-entropy over target positions (labels != -100), computed in fp32.

    The labels move, not the logits: position t's logits are scored against labels[t + 1], and the last position
    gets -100. logits[:, :-1] is not contiguous, so flattening it copied the whole (batch, seq, vocab) tensor, and
    its backward zero-filled and copied another (201 MB each for SmolLM2 at 4 x 256 tokens): fp32 loss forward +
    backward 383 -> 237 ms per micro-batch, the same gradients bit for bit (benchmarks/RESULTS.md "End to end").
    """
    import torch.nn.functional as F

    targets = F.pad(labels[:, 1:], (0, 1), value=-100).to(logits.device)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def _to_device(batch: dict, device: Any) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


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
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        keys = list(trainable_state_dict(unwrapped, full))
        whole = accelerator.get_state_dict(model)
        if not accelerator.is_main_process:
            return None
        missing = [k for k in keys if k not in whole]
        if missing:
            raise RuntimeError(f"gathered state dict lacks trainable tensors, e.g. {missing[:3]}")
        return {k: whole[k] for k in keys}
    return trainable_state_dict(unwrapped, full)


def base_model_reference(name_or_path: str) -> str:
    """What adapter_config.json records as the base: an absolute path for a local directory (so eval and merge
    work from any working directory), the hub id otherwise."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def _save_full_model(model: Any, tokenizer: Any, out: Path) -> None:
    """RUN_DIR/model: the trained weights as a plain Hugging Face folder (safetensors + tokenizer), atomically."""
    from abba_cli.fsutil import atomic_directory

    model.config.use_cache = True  # turned off for training; generation from the saved model wants it
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _load_adapter_tensors(model: Any, tensors: dict, source: Path, full: bool = False) -> None:
    import torch

    expected = trainable_state_dict(model, full)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{source}: adapter tensors do not match this config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    # PiSSA keeps its frozen residual factors as buffers; they are part of the adapter state too.
    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)


def _trackers(report_to: list[str]) -> list[str] | None:
    if not report_to:
        return None
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for name in report_to:
        if not available[name]():
            raise UserError(f"train.report_to: {name!r} is not installed (pip install 'abba-cli[{name}]')")
    return list(report_to)


def _flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
