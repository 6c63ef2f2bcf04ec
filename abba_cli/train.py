"""`abba train` and `abba validate`: one Accelerate training loop, written out in one place.

Order of work in `run_training`: run directory (refuse to overwrite) -> accelerator -> seed -> base model ->
adapters -> data -> optimizer + schedule -> resume state -> `_fit` -> final adapter + latest-run marker.

Exact resume (bitwise on CPU) rests on three choices:
- the data order of epoch e is a permutation drawn from its own generator seeded by (train.seed, e), so it
  never depends on how much global RNG was consumed before, and resuming means skipping micro-batches;
- no DataLoader iterator is created (creating one draws from the global torch RNG); batches are collated
  directly from the tokenized dataset;
- a checkpoint holds adapter weights, optimizer, scheduler, every RNG state and the data position, and the RNG
  states are restored last, just before the loop continues.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import yaml

from abba_cli.config import RunConfig, dump_config
from abba_cli.errors import UserError
from abba_cli.fsutil import atomic_write_text
from abba_cli.runs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FULL_MODEL_DIR
from abba_cli.signals import GracefulStop, TrainingStopped, signal_name

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
VAL_SUMMARY_FILE = "val_summary.json"
# Keys that may change between a run and its --resume without breaking exactness.
_RESUME_MAY_CHANGE = (
    "train.save_every",
    "train.save_total_limit",
    "train.log_every",
    "train.eval_every",  # validation draws no randomness, so its cadence never changes training
    "train.report_to",
    "eval.",
)


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


def run_training(
    cfg: RunConfig, config_path: str | Path, resume: bool = False, dry_run: bool = False
) -> Path | None:
    """Train per `cfg`; returns the run directory (None for a dry run)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from abba_cli import checkpoint as ckpt
    from abba_cli.adapters import inject_adapters, save_adapter, trainable_summary
    from abba_cli.adapters.abba import describe_paths

    t = cfg.train
    full = cfg.adapter.type == "full"
    run_dir = Path(cfg.output_dir)
    resume_from = None if dry_run else _check_run_dir(cfg, run_dir, resume)

    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        log_with=_trackers(t.report_to),
        project_dir=str(run_dir),
    )
    main = accelerator.is_main_process
    # Adapter init (SVD, Kaiming) and dropout draw from these generators: one seed makes the run repeatable.
    set_seed(t.seed)

    model, tokenizer = _load_model(cfg)
    tokenizer.padding_side = "right"  # training pads on the right; evaluation sets its own side
    if full:
        # No adapter: every weight of the base trains (keep model.dtype float32 for fp32 master weights).
        model.requires_grad_(True)
    else:
        inject_adapters(model, cfg.adapter, seed=t.seed)
    if t.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs; input grads keep the graph connected anyway.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError(
            f"adapter.target_modules {cfg.adapter.target_modules}: no trainable parameters were created"
        )

    dataset, val_dataset, collate = _build_dataset(cfg, tokenizer, accelerator.main_process_first)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_epoch = _micro_batches_per_epoch(len(dataset), t.micro_batch_size, world)
    total_steps = _total_steps(t.max_steps, t.epochs, per_epoch, t.grad_accum_steps)
    warmup = math.ceil(t.warmup_ratio * total_steps)
    summary = trainable_summary(model)
    plan = describe_paths(model, t.micro_batch_size * cfg.data.max_seq_len)
    if main:
        print(summary, file=sys.stderr)
        if plan:
            print(f"{plan} (full-length micro-batch; `auto` re-decides per batch)", file=sys.stderr)
        print(
            f"{len(dataset)} training examples, {per_epoch} micro-batches of {t.micro_batch_size} per epoch "
            f"x {world} process(es); {total_steps} optimizer steps of {t.grad_accum_steps} micro-batches "
            f"({total_steps * t.grad_accum_steps / per_epoch:.2f} epochs), {warmup} warmup steps",
            file=sys.stderr,
        )
        if val_dataset is not None:
            print(_describe_validation(cfg, len(val_dataset)), file=sys.stderr)
    if dry_run:
        print("dry run: nothing trained, nothing written")
        return None

    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = get_scheduler(
        "constant_with_warmup" if t.scheduler == "constant" else t.scheduler,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
    )
    # The scheduler stays unprepared: AcceleratedScheduler would step once per process, and total_steps is
    # already counted per process here.
    model, optimizer = accelerator.prepare(model, optimizer)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))
    if t.report_to:
        accelerator.init_trackers("abba", config=_flatten(cfg.model_dump(mode="json")))

    state = ckpt.TrainState(
        step=0, epoch=0, batch_in_epoch=0, micro_batches_seen=0, elapsed_s=0.0, tokens_seen=0
    )
    rng = None
    if resume_from is not None:
        state, tensors, opt_state, sched_state, rng_states = ckpt.load_checkpoint(resume_from)
        _load_adapter_tensors(accelerator.unwrap_model(model), tensors, resume_from, full)
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(sched_state)
        # One RNG state per process, and the data position counts global micro-batches of this many processes.
        if len(rng_states) != world:
            raise UserError(
                f"{resume_from}: saved by {len(rng_states)} process(es), resumed with {world}; "
                "resume with the same number of processes"
            )
        rng = rng_states[rank]
        if main:
            print(f"resuming from {resume_from} (step {state.step}/{total_steps})", file=sys.stderr)
    if main:
        _truncate_metrics(run_dir / METRICS_FILE, state.step)

    def save(state: ckpt.TrainState) -> Path | None:
        from accelerate.utils import gather_object

        rngs = gather_object([ckpt.rng_state()]) if world > 1 else [ckpt.rng_state()]
        tensors = gathered_trainable_state(accelerator, model, full)  # collective: every process calls it
        path = None
        if main:
            path = ckpt.save_checkpoint(
                run_dir,
                state,
                tensors,
                optimizer.state_dict(),
                scheduler.state_dict(),
                rngs,
                t.save_total_limit,
            )
        accelerator.wait_for_everyone()
        return path

    if rng is not None:
        ckpt.set_rng_state(rng)  # last, so nothing between here and the first batch draws from it
    # SIGINT/SIGTERM no longer kill the loop mid-step: it finishes the step, checkpoints and says how to resume.
    with GracefulStop() as stop:
        _fit(
            cfg,
            accelerator,
            model,
            optimizer,
            scheduler,
            params,
            dataset,
            val_dataset,
            collate,
            state,
            total_steps,
            per_epoch,
            run_dir,
            save,
            stop,
        )

    accelerator.wait_for_everyone()
    final_tensors = None if full else gathered_trainable_state(accelerator, model, full)
    if main:
        if full:
            _save_full_model(accelerator.unwrap_model(model), tokenizer, run_dir / FULL_MODEL_DIR)
        else:
            save_adapter(
                accelerator.unwrap_model(model),
                cfg.adapter,
                run_dir,
                base_model=base_model_reference(cfg.model.name_or_path),
                tensors=final_tensors,
            )
        from abba_cli.runs import record_latest

        record_latest(run_dir)
        print(f"run directory: {run_dir}")
        if full:
            print(f"  model:    {run_dir / FULL_MODEL_DIR} (plain Hugging Face folder, already 'merged')")
        else:
            print(f"  adapter:  {run_dir / ADAPTER_WEIGHTS} (+ {ADAPTER_CONFIG})")
        print(f"  config:   {run_dir / CONFIG_FILE}")
        print(f"  metrics:  {run_dir / METRICS_FILE}")
        if t.save_every:
            print(f"  checkpoints: {run_dir / ckpt.CHECKPOINTS}")
        if full:
            print("next: abba eval --task <task>   (defaults to this run)")
        else:
            print("next: abba eval --task <task>   |   abba merge --out <dir>   (both default to this run)")
    accelerator.end_training()
    return run_dir


def _fit(
    cfg: RunConfig,
    accelerator: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    params: list,
    dataset: Any,
    val_dataset: Any,
    collate: Callable,
    state: Any,
    total_steps: int,
    per_epoch: int,
    run_dir: Path,
    save: Callable,
    stop: GracefulStop | None = None,
) -> None:
    """The optimisation loop: accumulate micro-batches, clip, step, log, checkpoint; stop on a non-finite loss,
    or after the current step (with a checkpoint) when `stop` caught SIGINT/SIGTERM."""
    import torch
    from tqdm.auto import tqdm

    from abba_cli.checkpoint import latest_checkpoint

    t = cfg.train
    main = accelerator.is_main_process
    batches = _batch_stream(
        len(dataset),
        t.micro_batch_size,
        t.seed,
        accelerator.num_processes,
        accelerator.process_index,
        state.micro_batches_seen,
        per_epoch,
        list(dataset["length"]) if cfg.data.group_by_length else None,
    )
    bar = tqdm(
        total=total_steps, initial=state.step, disable=not main, unit="step", dynamic_ncols=True, desc="train"
    )
    start, elapsed0, tokens0 = time.perf_counter(), state.elapsed_s, state.tokens_seen
    best = _best_val(run_dir / METRICS_FILE) if val_dataset is not None else None
    model.train()
    while state.step < total_steps:
        host = [
            collate([dataset[i] for i in idx])
            for _, _, idx in (next(batches) for _ in range(t.grad_accum_steps))
        ]
        # Counted on the host copies, before they move: int() of a device tensor is a host sync (on a GPU, two
        # per micro-batch, each waiting for the queue to drain).
        n_tokens = sum(int(b["attention_mask"].sum()) for b in host)
        micro = [_to_device(b, accelerator.device) for b in host]
        # Normalise by the target tokens of the whole optimizer step, so accumulation equals one big batch.
        # Across processes too: DDP averages gradients over processes, so each process scales its token sum by
        # world / (targets of all processes); a global batch then trains exactly as one process would.
        all_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in host)
        world = accelerator.num_processes
        if world > 1:
            all_targets = int(
                accelerator.reduce(torch.tensor(all_targets, device=accelerator.device), "sum").item()
            )
        n_targets = max(all_targets, 1) / world
        step_loss = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = _target_loss_sum(logits, batch["labels"]) / n_targets
                accelerator.backward(loss)
            step_loss += loss.detach()
        loss_value = accelerator.reduce(step_loss, "mean").item()
        if not math.isfinite(loss_value):
            bar.close()
            _diverged(run_dir, state.step + 1, f"loss {loss_value}")
        # Clipping at +inf leaves gradients untouched and still returns the norm for the log.
        grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # A huge update can overflow the weights while this step's loss was still finite; catch it here so
        # no checkpoint and no final adapter ever holds inf/nan.
        if not _all_finite(params, accelerator):
            bar.close()
            _diverged(run_dir, state.step + 1, f"loss {loss_value}, adapter weights inf/nan after the update")

        if world > 1:
            n_tokens = int(
                accelerator.reduce(torch.tensor(n_tokens, device=accelerator.device), "sum").item()
            )
        state.tokens_seen += n_tokens
        state.step += 1
        state.micro_batches_seen += t.grad_accum_steps
        state.epoch, state.batch_in_epoch = divmod(state.micro_batches_seen, per_epoch)
        now = time.perf_counter() - start
        state.elapsed_s = elapsed0 + now
        tok_s = (state.tokens_seen - tokens0) / max(now, 1e-9)
        bar.update(1)
        val = None
        if val_dataset is not None and (
            state.step == total_steps or (t.eval_every and state.step % t.eval_every == 0)
        ):
            val = _validation_loss(accelerator, model, val_dataset, collate, t.micro_batch_size)
            if best is None or val["val_loss"] < best["best_val_loss"]:
                best = {"best_val_loss": val["val_loss"], "best_val_step": state.step}
            if main:
                _write_val_summary(run_dir, state.step, val, best)
                bar.write(
                    f"step {state.step}: val_loss {val['val_loss']:.4f} "
                    f"(best {best['best_val_loss']:.4f} at step {best['best_val_step']})",
                    file=sys.stderr,
                )
        postfix = dict(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
        if best is not None:
            postfix["best_val"] = f"{best['best_val_loss']:.4f}"
        bar.set_postfix(postfix)
        if state.step % t.log_every == 0 or state.step == total_steps or val is not None:
            record = {
                "step": state.step,
                "epoch": round(state.micro_batches_seen / per_epoch, 4),
                "loss": loss_value,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": round(tok_s, 1),
                "tokens": state.tokens_seen,
                "elapsed_s": round(state.elapsed_s, 2),
                **(val or {}),
            }
            if main:
                with open(run_dir / METRICS_FILE, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if t.report_to:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
        saved = bool(t.save_every) and (state.step % t.save_every == 0 or state.step == total_steps)
        if saved:
            save(state)
        if state.step < total_steps and _stop_requested(stop, accelerator):
            path = save(state) if not saved else latest_checkpoint(run_dir)
            bar.close()
            signum = stop.signum if stop is not None and stop.signum is not None else signal.SIGTERM
            raise TrainingStopped(
                f"stopped by {signal_name(signum)} after step {state.step}/{total_steps}; checkpoint {path}; "
                f"resume with: abba train {run_dir / CONFIG_FILE} --resume",
                signum,
            )
    bar.close()


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
    """Stop on divergence: name the step and the last good checkpoint (written before it, so finite)."""
    from abba_cli.checkpoint import latest_checkpoint

    last = latest_checkpoint(run_dir)
    where = (
        f"the last good checkpoint is {last} (resume from it: abba train {run_dir / CONFIG_FILE} --resume)"
        if last
        else "no checkpoint was saved yet"
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
    )


def _build_dataset(
    cfg: RunConfig, tokenizer: Any, main_process_first: Any = None
) -> tuple[Any, Any, Callable]:
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
    return dataset, val_dataset, data.make_collator(tokenizer)


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
    """Sum of next-token cross-entropy over target positions (labels != -100), computed in fp32."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
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


def _check_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> Path | None:
    """Refuse to overwrite a run; for --resume, check the config matches and pick the latest checkpoint."""
    from abba_cli.checkpoint import latest_checkpoint

    exists = run_dir.exists() and any(run_dir.iterdir()) if run_dir.is_dir() else run_dir.exists()
    if not resume:
        if exists:
            raise UserError(
                f"output_dir {run_dir} already exists; pass --resume to continue that run, or choose a new "
                f"directory (--set output_dir=...)"
            )
        return None
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(
            f"--resume: {run_dir} holds no run to resume (no {CONFIG_FILE}); train without --resume"
        )
    saved = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    diffs = [
        k for k in _diff_keys(saved, cfg.model_dump(mode="json")) if not k.startswith(_RESUME_MAY_CHANGE)
    ]
    if diffs:
        raise UserError(
            f"--resume: the config differs from {run_dir / CONFIG_FILE} in {', '.join(diffs)}; "
            "an exact resume needs the same settings"
        )
    latest = latest_checkpoint(run_dir)
    if latest is None:
        print(f"--resume: no checkpoint in {run_dir} yet; starting it from step 0", file=sys.stderr)
    return latest


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = list(dict.fromkeys([*a, *b]))
        return [d for k in keys for d in _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past `step`: after a resume those steps are run (and logged) again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


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
