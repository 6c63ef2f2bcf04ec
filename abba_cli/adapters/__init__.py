"""Adapter layers (ABBA, LoRA, HiRA, DoRA), their injection into a model, merging and the run-directory files."""

from abba_cli.adapters.abba import ABBALinear, abba_scaling, choose_path
from abba_cli.adapters.base import AdapterLinear
from abba_cli.adapters.compile import compile_model
from abba_cli.adapters.dora import DoRALinear
from abba_cli.adapters.hira import HiRALinear
from abba_cli.adapters.inject import (
    TrainableSummary,
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    merge_adapters,
    scaling_for,
    trainable_summary,
    unmerge_adapters,
    unwrap_adapters,
)
from abba_cli.adapters.io import (
    adapter_config_from_dict,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from abba_cli.adapters.lora import LoRALinear, lora_scaling

__all__ = [
    "ABBALinear",
    "AdapterLinear",
    "DoRALinear",
    "HiRALinear",
    "LoRALinear",
    "TrainableSummary",
    "abba_scaling",
    "adapter_config_from_dict",
    "adapter_layers",
    "adapter_state_dict",
    "choose_path",
    "compile_model",
    "inject_adapters",
    "load_adapter",
    "lora_scaling",
    "merge_adapters",
    "read_adapter_config",
    "save_adapter",
    "scaling_for",
    "trainable_summary",
    "unmerge_adapters",
    "unwrap_adapters",
]
