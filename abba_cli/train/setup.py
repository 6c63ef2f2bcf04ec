"""The setup steps of `run_training`, one function each, in the order it calls them."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from abba_cli.config import RunConfig, dump_config
from abba_cli.errors import UserError
from abba_cli.run.layout import CONFIG_FILE
from abba_cli.run.training_dir import Resume
from abba_cli.train.context import Run, TrainData
from abba_cli.train.val_loss import describe_validation
from abba_cli.util.files import atomic_write_text

ENGINES = {
    "ddp": "ddp",
    "fsdp": "fsdp: FSDP2",
    "zero2": "zero2: DeepSpeed ZeRO-2",
    "zero3": "zero3: DeepSpeed ZeRO-3",
}


def setup_accelerator(cfg: RunConfig, run_dir: Path) -> tuple[Any, str]:
    """(the Accelerator, the distributed strategy it runs: ddp | fsdp | zero2 | zero3)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from abba_cli.train.distributed import (
        accelerator_plugins,
        check_engine_installed,
        resolve_strategy,
        select_fsdp_on_cpu_processes,
    )

    t = cfg.train
    strategy = resolve_strategy(cfg)
    check_engine_installed(strategy)
    if cfg.adapter.type == "full" and strategy in ("fsdp", "zero3"):
        raise UserError(
            f"adapter.type full with distributed.strategy {strategy}: the final model is not gathered from its "
            "shards yet; use ddp or zero2 for full fine-tuning"
        )
    if t.compile:
        from abba_cli.train.compiling import check_engine_compiles

        check_engine_compiles(strategy)
    # Accelerator's own gradient_accumulation_steps stays 1: it would divide each micro-batch's loss by it,
    # and the loop already normalises by the whole step's target tokens (loop.accumulate_gradients). The loop
    # marks the last micro-batch of a step itself (DeepSpeed's engine steps there; see loop.py).
    plugins = accelerator_plugins(cfg, strategy)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        log_with=tracker_names(t.report_to),
        project_dir=str(run_dir),
        **plugins,
    )
    select_fsdp_on_cpu_processes(accelerator, plugins.get("fsdp_plugin"))
    # Adapter init (SVD, Kaiming) and dropout draw from these generators: one seed makes the run repeatable.
    set_seed(t.seed)
    return accelerator, strategy


def setup_model(cfg: RunConfig, accelerator: Any = None, strategy: str = "ddp") -> tuple[Any, Any, list]:
    """(model with its adapters, tokenizer, trainable parameters)."""
    from abba_cli.adapters import inject_adapters
    from abba_cli.models.loading import load_configured_base

    # FSDP2 start-up that scales (Accelerate's cpu_ram_efficient_loading): only the main process reads the
    # weights and initialises the adapters; the others build the model on the meta device, and prepare()
    # broadcasts every tensor from the main process into the shards.
    skeleton = (
        strategy == "fsdp"
        and accelerator is not None
        and accelerator.is_fsdp2
        and accelerator.num_processes > 1
        and not accelerator.is_main_process
    )
    with whole_weights_while_loading():
        model, tokenizer = load_configured_base(cfg.model, empty_weights=skeleton)
    if (
        strategy == "fsdp"
        and accelerator is not None
        and accelerator.is_fsdp2
        and accelerator.num_processes > 1
    ):
        _match_main_dtype(model, accelerator)
    tokenizer.padding_side = "right"  # training pads on the right; evaluation sets its own side
    if cfg.adapter.type == "full":
        # No adapter: every weight of the base trains (keep model.dtype float32 for fp32 master weights).
        model.requires_grad_(True)
    else:
        inject_adapters(model, cfg.adapter, seed=cfg.train.seed, init=not skeleton)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs; input grads keep the graph connected anyway.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    if cfg.train.compile:
        # Compiled after prepare() (train/compiling.py); the paths are fixed now so the plan line shows them.
        from abba_cli.train.execution_plan import fix_auto_paths, training_device_type

        fix_auto_paths(model, cfg.train.micro_batch_size * cfg.data.max_seq_len, training_device_type())
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError(
            f"adapter.target_modules {cfg.adapter.target_modules}: no trainable parameters were created"
        )
    return model, tokenizer, params


def _match_main_dtype(model: Any, accelerator: Any) -> None:
    """Give the meta skeleton's parameters the dtype the main process loaded (`model.dtype: auto` reads it from
    the checkpoint): every process's shards must have one dtype. Parameters only: buffers keep the dtype the
    model's code gave them, as on the main process (a bf16 rotary `inv_freq` would encode positions otherwise)."""
    from accelerate.utils import broadcast_object_list

    dtype = [str(model.dtype).removeprefix("torch.")]
    broadcast_object_list(dtype, from_process=0)
    import torch

    target = getattr(torch, dtype[0])
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(target)


@contextmanager
def whole_weights_while_loading() -> Iterator[None]:
    """Load the base with whole weights even under ZeRO-3: Accelerate's DeepSpeed plugin registers its config
    with transformers, whose from_pretrained then builds the model partitioned (deepspeed.zero.Init), where
    the ABBA/PiSSA SVD initialisation cannot read W0. deepspeed.initialize partitions it at prepare() instead.
    """
    from accelerate.state import AcceleratorState, is_initialized

    plugin = AcceleratorState().deepspeed_plugin if is_initialized() else None
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def setup_data(cfg: RunConfig, tokenizer: Any, accelerator: Any) -> TrainData:
    t = cfg.train
    dataset, val_dataset, collate, sha256 = build_dataset(cfg, tokenizer, accelerator.main_process_first)
    per_epoch = micro_batches_per_epoch(len(dataset), t.micro_batch_size, accelerator.num_processes)
    total_steps = count_total_steps(t.max_steps, t.epochs, per_epoch, t.grad_accum_steps)
    warmup = math.ceil(t.warmup_ratio * total_steps)
    return TrainData(dataset, val_dataset, collate, per_epoch, total_steps, warmup, sha256)


def run_extension(cfg: RunConfig, resume: Resume | None, data: TrainData) -> int | None:
    """The run's old total of steps when this --resume extends it (a larger train.max_steps / epochs)."""
    if resume is None or resume.extends is None:
        return None
    saved, t = resume.extends, cfg.train
    old = count_total_steps(
        saved.get("max_steps"), saved.get("epochs", 1.0), data.per_epoch, t.grad_accum_steps
    )
    if data.total_steps < old:
        raise UserError(
            f"--resume: train.max_steps/train.epochs give {data.total_steps} steps, fewer than the run's {old}; "
            "a run can be extended to a larger total, not shortened (its checkpoints are kept: evaluate one)"
        )
    return old if data.total_steps > old else None


def print_plan(
    cfg: RunConfig, model: Any, data: TrainData, world: int, engine: str = "", loss_impl: str = "full"
) -> None:
    from abba_cli.adapters import trainable_summary
    from abba_cli.train.execution_plan import describe_execution, training_device_type
    from abba_cli.train.loss import describe_loss_impl

    t = cfg.train
    print(trainable_summary(model), file=sys.stderr)
    if cfg.adapter.type == "lora_pro":
        from abba_cli.train.lora_pro import describe_state

        print(describe_state(model), file=sys.stderr)
    tokens = t.micro_batch_size * cfg.data.max_seq_len
    plan = describe_execution(model, tokens, training_device_type(), fixed=t.compile)
    if plan:
        print(plan, file=sys.stderr)
    stats = getattr(data.train, "stats", None)
    if stats is not None:  # data.packing
        print(stats(), file=sys.stderr)
    print(
        f"{len(data.train)} training {'rows' if stats else 'examples'}, {data.per_epoch} micro-batches of "
        f"{t.micro_batch_size} per epoch "
        f"x {world} process(es){f' ({engine})' if engine else ''}; {data.total_steps} optimizer steps of {t.grad_accum_steps} micro-batches "
        f"({data.total_steps * t.grad_accum_steps / data.per_epoch:.2f} epochs), {data.warmup} warmup steps",
        file=sys.stderr,
    )
    print(describe_loss_impl(loss_impl, model, tokens), file=sys.stderr)
    if data.val is not None:
        print(describe_validation(cfg, len(data.val)), file=sys.stderr)


def setup_optimizer(cfg: RunConfig, params: list, data: TrainData) -> tuple[Any, Any]:
    import torch
    from transformers import get_scheduler

    t = cfg.train
    if cfg.adapter.type == "lora_pro":
        from abba_cli.adapters import scaling_for
        from abba_cli.train.lora_pro import LoRAProAdamW

        # The trainable parameters are exactly the LoRA layers' (A, B) pairs, in model order.
        optimizer = LoRAProAdamW(params, scaling_for(cfg.adapter), lr=t.lr, weight_decay=t.weight_decay)
    else:
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


def start_run_dir(run: Run, fresh: bool) -> None:
    if run.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        if fresh or run.extends_from is not None:  # an extended run's config states its new total
            atomic_write_text(run.run_dir / CONFIG_FILE, dump_config(run.cfg))
    if run.cfg.train.report_to:
        run.accelerator.init_trackers("abba", config=flatten_config(run.cfg.model_dump(mode="json")))


def build_dataset(
    cfg: RunConfig, tokenizer: Any, main_process_first: Any = None
) -> tuple[Any, Any, Callable, str]:
    """(training dataset, validation dataset or None, collator). data.val_samples examples are held out of the
    training source before the training subset is drawn (recipes.load_split), so the two never overlap."""
    from abba_cli.data.collate import make_collator
    from abba_cli.data.training_set import prepare_train_dataset
    from abba_cli.train.compiling import PAD_MULTIPLE

    d = cfg.data
    dataset, val_dataset = prepare_train_dataset(d, tokenizer, cfg.model.name_or_path, main_process_first)
    if len(dataset) == 0:
        raise UserError(
            f"data.recipe {d.recipe!r}: no training examples left (check data.num_samples/skip_samples)"
        )
    sha256 = examples_sha256(dataset)
    if not d.packing:
        # Compiled layers see few distinct lengths: multiples of PAD_MULTIPLE up to max_seq_len.
        pad = (PAD_MULTIPLE, d.max_seq_len) if cfg.train.compile else (None, None)
        return dataset, val_dataset, make_collator(tokenizer, *pad), sha256
    from abba_cli.data.packing import PackedRows, make_packed_collator

    # Rows are fixed for the run (train.seed); each epoch shuffles them (data/order.py).
    train_rows = PackedRows(dataset, d.max_seq_len, cfg.train.seed)
    val_rows = None if val_dataset is None else PackedRows(val_dataset, d.max_seq_len, cfg.train.seed)
    collate = make_packed_collator(tokenizer, d.max_seq_len, cfg.model.attn_implementation)
    return train_rows, val_rows, collate, sha256


def examples_sha256(dataset: Any) -> str:
    """A content hash of the tokenized training examples (ids and labels, in order), checked on --resume."""
    digest = hashlib.sha256()
    for column in ("input_ids", "labels"):
        digest.update(json.dumps(list(dataset[column])).encode())
    return digest.hexdigest()


def micro_batches_per_epoch(n: int, micro_batch_size: int, world: int) -> int:
    return math.ceil(n / (micro_batch_size * world))


def count_total_steps(max_steps: int | None, epochs: float, per_epoch: int, accum: int) -> int:
    if max_steps is not None:
        return max_steps
    # Steps consume micro-batches from one continuous stream of epochs, so the last step may reach a few
    # micro-batches into the next (reshuffled) epoch rather than dropping examples.
    return max(1, math.ceil(epochs * per_epoch / accum))


def tracker_names(report_to: list[str]) -> list[str] | None:
    if not report_to:
        return None
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for name in report_to:
        if not available[name]():
            raise UserError(f"train.report_to: {name!r} is not installed (pip install 'abba-cli[{name}]')")
    return list(report_to)


def flatten_config(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
