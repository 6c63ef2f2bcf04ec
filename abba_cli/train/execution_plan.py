"""Which ABBA path each layer runs, priced for the device that will train it: one rule for `abba train`'s plan
line and `abba validate`, so the two commands print the same plan for the same config on the same machine.

`auto` prices each path with constants per device type (adapters/cost.py). Both commands build the model on the
CPU (train before `prepare()` moves it, validate on the meta device), so neither may price for where the weights
are now: both ask `training_device_type`, which picks the device as Accelerate will.
"""

from __future__ import annotations

import os
from typing import Any

DEVICE_TYPES = ("cuda", "cpu")


def training_device_type(device: str | None = None) -> str:
    """The device type training runs on: `device` when given (`abba validate --device`); cpu when Accelerate
    is told to use the CPU (ACCELERATE_USE_CPU, `accelerate launch --cpu`); else the accelerator torch finds
    (cuda on a GPU machine); else cpu."""
    if device is not None:
        return device
    if os.environ.get("ACCELERATE_USE_CPU", "false").strip().lower() in ("1", "true", "yes"):
        return "cpu"
    import torch

    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return accelerator.type if accelerator is not None else "cpu"


def describe_execution(model: Any, tokens: int, device_type: str, fixed: bool = False) -> str | None:
    """The plan line: each ABBA layer's path at `tokens` tokens per micro-batch on `device_type`, and which cost
    constants chose it; None when the model has no ABBA layer. `fixed`: the paths were fixed for the run
    (train.compile), rather than re-decided per batch."""
    from abba_cli.adapters.abba import describe_paths
    from abba_cli.adapters.cost import constants_name

    plan = describe_paths(model, tokens, device_type)
    if plan is None:
        return None
    how = "fixed for the run (train.compile)" if fixed else "`auto` re-decides per batch"
    return f"{plan} (full-length micro-batch, priced for {device_type} with {constants_name(device_type)}; {how})"


def fix_auto_paths(model: Any, tokens: int, device_type: str) -> None:
    """Resolve every `auto` ABBA layer once, for the full-length micro-batch on the training device, and keep it.

    Under torch.compile a path chosen per batch is a guard on the token count: each batch on the other side of a
    threshold would compile the layer again. Padded lengths stay at or below the full length, where the choice
    was made."""
    from torch import nn

    from abba_cli.adapters.base import AdapterLinear

    for module in model.modules():  # ABBA layers of two pairs or a chain (kind "abba")
        if isinstance(module, AdapterLinear) and module.kind == "abba" and module.path == "auto":
            dropout = isinstance(module.dropout, nn.Dropout) and module.dropout.p > 0
            module.path = module.resolved_path(tokens, dropout, device_type)
