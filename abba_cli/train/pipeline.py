"""`abba train`: `run_training` builds the run in dependency order, then runs one loop, then finishes.

Setup (each step a named function of train/setup.py, in the order it must happen): output_dir checked ->
accelerator + seed -> run directory locked and checked (run/training_dir.py) -> base model and adapters ->
data -> optimizer + schedule -> run directory files -> resume state (train/state.py). Then `fit`
(train/loop.py) and `finish` (train/finish.py).

Exact resume (bitwise on CPU) rests on three choices:
- the data order of epoch e is a permutation drawn from its own generator seeded by (train.seed, e)
  (data/order.py), so it never depends on how much global RNG was consumed before, and resuming means
  skipping micro-batches;
- no DataLoader iterator is created (creating one draws from the global torch RNG); batches are collated
  directly from the tokenized dataset;
- a checkpoint holds adapter weights, optimizer, scheduler, every RNG state and the data position, and the RNG
  states are restored last, just before the loop continues.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from abba_cli.config import RunConfig
from abba_cli.data.packing import check_packing
from abba_cli.run.training_dir import RunLock, check_run_dir
from abba_cli.train.compiling import compile_for_training
from abba_cli.train.context import Run
from abba_cli.train.distributed import describe_engine
from abba_cli.train.execution_plan import training_device_type
from abba_cli.train.finish import finish
from abba_cli.train.loop import fit
from abba_cli.train.loss import check_loss_impl, resolve_loss_impl
from abba_cli.train.setup import (
    print_plan,
    run_extension,
    setup_accelerator,
    setup_data,
    setup_model,
    setup_optimizer,
    start_run_dir,
)
from abba_cli.train.state import restore
from abba_cli.util.files import check_output_dir
from abba_cli.util.signals import GracefulStop, ctrl_c_interrupts


def run_training(
    cfg: RunConfig, config_path: str | Path, resume: bool = False, dry_run: bool = False
) -> Path | None:
    """Train per `cfg`; returns the run directory (None for a dry run)."""
    with ctrl_c_interrupts():
        return _run_training(cfg, resume, dry_run)


def _run_training(cfg: RunConfig, resume: bool, dry_run: bool) -> Path | None:
    from abba_cli.train import checkpoint as ckpt

    run_dir = Path(cfg.output_dir)
    check_output_dir(run_dir, key="output_dir")
    check_packing(cfg)
    check_loss_impl(cfg, training_device_type())
    accelerator, strategy = setup_accelerator(cfg, run_dir)
    # The main process locks the run directory for the whole run: a second `abba train` on it fails at once.
    with RunLock(run_dir) if accelerator.is_main_process and not dry_run else nullcontext():
        resume_plan = None if dry_run else check_run_dir(cfg.model_dump(mode="json"), run_dir, resume)
        model, tokenizer, params = setup_model(cfg, accelerator, strategy)
        data = setup_data(cfg, tokenizer, accelerator)
        loss_impl = resolve_loss_impl(cfg, model)
        if accelerator.is_main_process:
            print_plan(cfg, model, data, accelerator.num_processes, describe_engine(accelerator), loss_impl)
        if dry_run:
            print("dry run: nothing trained, nothing written")
            return None
        optimizer, scheduler = setup_optimizer(cfg, params, data)
        model, optimizer = accelerator.prepare(model, optimizer)
        # After prepare(): the engines' hooks (FSDP2's all-gathers, DeepSpeed's) are in place before tracing.
        compiled = compile_for_training(model, cfg.train.compile_backend) if cfg.train.compile else None
        # FSDP2 replaces each parameter by a sharded DTensor: clipping and the finiteness check need those.
        params = [p for p in model.parameters() if p.requires_grad]
        run = Run(cfg, run_dir, accelerator, model, tokenizer, params, data, optimizer, scheduler, strategy)
        run.loss_impl = loss_impl
        run.extends_from = run_extension(cfg, resume_plan, data)
        start_run_dir(run, fresh=resume_plan is None)
        rng = restore(run, resume_plan.checkpoint if resume_plan else None)
        if rng is not None:
            ckpt.set_rng_state(rng)  # last, so nothing between here and the first batch draws from it
        # SIGINT/SIGTERM do not kill the loop mid-step: it finishes the step, checkpoints, says how to resume.
        with GracefulStop() as run.stop:
            fit(run)
        if compiled is not None and run.main:
            compiled.report()
        finish(run)
    return run_dir
