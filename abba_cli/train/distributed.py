"""The distributed strategy: which engine shares the model between processes (DDP, FSDP2, DeepSpeed ZeRO-2/3),
the Accelerate plugin that builds it, and the checks that turn a wrong combination into one clear line.

The process count always comes from the launcher (torchrun, `accelerate launch`, srun); the run config only
says how the processes share the model (`distributed.strategy`). An Accelerate config file (`accelerate launch
--config_file`, which exports ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED and its settings) may choose the
engine instead; when both choose, they must agree.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from abba_cli.config import RunConfig
from abba_cli.errors import UserError

ZERO_STAGE = {"zero2": 2, "zero3": 3}


def _true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launcher_strategy() -> str | None:
    """The engine an Accelerate config file chose through the environment (None: it chose none)."""
    if _true("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2").strip()
        return f"zero{stage}"
    if _true("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return None


def resolve_strategy(cfg: RunConfig) -> str:
    """distributed.strategy, or the Accelerate config's engine when the run config does not set one."""
    d = cfg.distributed
    launcher = launcher_strategy()
    if launcher is None:
        return d.strategy
    chosen = "strategy" in d.model_fields_set
    if chosen and launcher != d.strategy:
        raise UserError(
            f"distributed.strategy {d.strategy!r} contradicts the Accelerate config ({_describe(launcher)}); "
            "set one of the two, or make them agree"
        )
    if launcher not in ("fsdp", *ZERO_STAGE):
        raise UserError(
            f"the Accelerate config chose {_describe(launcher)}; abba supports DeepSpeed ZeRO stages 2 and 3 "
            "(distributed.strategy zero2 | zero3)"
        )
    if launcher == "fsdp" and os.environ.get("FSDP_VERSION", "2").strip() != "2":
        raise UserError(
            "the Accelerate config sets fsdp_version 1; FSDP1 cannot shard a layer holding a frozen weight and "
            "trainable adapter factors: set fsdp_version: 2 (or distributed.strategy: fsdp without the file)"
        )
    return launcher


def _describe(strategy: str) -> str:
    if strategy == "fsdp":
        return "ACCELERATE_USE_FSDP=true, FSDP"
    return f"ACCELERATE_USE_DEEPSPEED=true, ZeRO stage {strategy.removeprefix('zero')}"


def check_engine_installed(strategy: str) -> None:
    if strategy in ZERO_STAGE and importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            f"distributed.strategy {strategy}: DeepSpeed is not installed; pip install 'abba-cli[deepspeed]'"
        )


def accelerator_plugins(cfg: RunConfig, strategy: str) -> dict[str, Any]:
    """The keyword arguments of `Accelerator(...)` that select and configure the engine."""
    if strategy == "fsdp":
        return {"fsdp_plugin": fsdp_plugin(cfg)}
    if strategy in ZERO_STAGE:
        kwargs: dict[str, Any] = {"deepspeed_plugin": deepspeed_plugin(cfg, strategy)}
        if not _has_gpu():
            # DeepSpeed on CPU processes: Accelerate turns DeepSpeed off under ACCELERATE_USE_CPU (its CPU path is
            # plain multi-CPU DDP), and finds no process-group backend without an accelerator; DeepSpeed's
            # CPU accelerator with gloo is what runs instead.
            from accelerate.utils import InitProcessGroupKwargs

            os.environ.pop("ACCELERATE_USE_CPU", None)
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        return kwargs
    return {}


def fsdp_plugin(cfg: RunConfig) -> Any:
    """FSDP2 (`fully_shard`): unlike FSDP1 it shards a module mixing frozen and trainable parameters, and its
    parameters stay the original ones (DTensors), so clipping and the optimizer see every trainable tensor."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from abba_cli.train.precision import fsdp_mixed_precision_policy

    d = cfg.distributed
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        # Each decoder layer one unit (its weights gathered for its forward only): the model's own
        # _no_split_modules unless wrap_layers (or the Accelerate config) names the classes.
        auto_wrap_policy=os.environ.get("FSDP_AUTO_WRAP_POLICY") or "transformer_based_wrap",
        transformer_cls_names_to_wrap=d.wrap_layers,
        cpu_offload=True if d.offload_params else None,  # None: the Accelerate config's, else off
        state_dict_type="FULL_STATE_DICT",
        # Only the main process reads the base weights; the others build it on the meta device (transformers
        # does this under this flag) and receive every tensor, adapters included, by broadcast in prepare().
        cpu_ram_efficient_loading=True,
        # Kept by Accelerate (it builds a bf16-everywhere policy only when none is given): train/precision.py.
        mixed_precision_policy=fsdp_mixed_precision_policy(),
    )


def deepspeed_plugin(cfg: RunConfig, strategy: str) -> Any:
    """DeepSpeed ZeRO with every batch setting concrete: no dataloader is passed to `prepare()`, so DeepSpeed's
    `auto` micro-batch size could not be resolved, and its accumulation must equal train.grad_accum_steps (the
    engine steps at the boundary the loop marks)."""
    if "DS_ACCELERATOR" not in os.environ and not _has_gpu():
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed otherwise assumes CUDA and fails to import its ops
    from accelerate.utils import DeepSpeedPlugin

    from abba_cli.train.precision import apply_deepspeed_precision

    t, d = cfg.train, cfg.distributed
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config_file != "none":
        from accelerate.utils.deepspeed import HfDeepSpeedConfig

        hf = HfDeepSpeedConfig(config_file).config
    else:
        hf = {"zero_optimization": {"stage": ZERO_STAGE[strategy]}}
    apply_deepspeed_precision(
        hf, t.mixed_precision, config_file if config_file != "none" else "the DeepSpeed config"
    )
    hf.setdefault("train_micro_batch_size_per_gpu", t.micro_batch_size)
    hf.setdefault("gradient_accumulation_steps", t.grad_accum_steps)
    hf.setdefault("train_batch_size", "auto")
    hf.setdefault("gradient_clipping", t.max_grad_norm or 0.0)  # 0: DeepSpeed does not clip
    hf.setdefault("zero_allow_untested_optimizer", True)  # our torch AdamW, wrapped by ZeRO
    zero = hf["zero_optimization"]
    if d.offload_optimizer:
        zero.setdefault("offload_optimizer", {"device": "cpu"})
    if d.offload_params:
        zero.setdefault("offload_param", {"device": "cpu"})
    if ZERO_STAGE[strategy] == 3:
        # The adapter is gathered by abba (GatheredParameters) and the base is never saved; no 16-bit copy.
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", False)
    for key, ours in (
        ("train_micro_batch_size_per_gpu", t.micro_batch_size),
        ("gradient_accumulation_steps", t.grad_accum_steps),
        ("zero_optimization.stage", ZERO_STAGE[strategy]),
    ):
        node: Any = hf
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node not in (ours, "auto"):
            raise UserError(
                f"{config_file}: {key} is {node}, the run config gives {ours}; set them equal (or leave "
                "it `auto` in the DeepSpeed config)"
            )
    _fill_auto(
        hf,
        {
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": t.grad_accum_steps,
        },
    )
    return DeepSpeedPlugin(hf_ds_config=hf, zero3_init_flag=False)


def _fill_auto(hf: dict, values: dict) -> None:
    for key, value in values.items():
        if hf.get(key) == "auto":
            hf[key] = value


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() and not _true("ACCELERATE_USE_CPU")


def select_fsdp_on_cpu_processes(accelerator: Any, plugin: Any) -> None:
    """Run FSDP2 on CPU processes too. Accelerate selects FSDP only on accelerators (on CPU it keeps plain
    multi-CPU DDP and ignores the plugin, silently); torch's fully_shard itself runs on a CPU mesh with gloo. So
    on CPU processes abba selects FSDP itself, with the same plugin and the same prepare() path as on GPUs:
    what the CPU tests check is what a GPU run executes."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    # FSDP already, but without the plugin: an earlier run in these processes (compare, one launch training
    # several configs) left FSDP in the shared process state, which a fresh Accelerator copies.
    unset = (
        accelerator.distributed_type == DistributedType.FSDP and getattr(state, "fsdp_plugin", None) is None
    )
    if plugin is None or not (accelerator.distributed_type == DistributedType.MULTI_CPU or unset):
        return
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)  # as Accelerate's GPU path does (state.py)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def describe_engine(accelerator: Any) -> str:
    """What Accelerate actually runs (not what was asked for): the plan line shows it, and tests check it."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        return "FSDP2" if accelerator.is_fsdp2 else "FSDP1"
    return "DDP" if accelerator.num_processes > 1 else "one process"
