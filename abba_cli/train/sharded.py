"""Checkpoint state under a sharding engine: the whole trainable tensors gathered from their shards, and the
optimizer state saved and restored the way each engine holds it.

- ddp: every process holds everything; the main process saves `optimizer.state_dict()` as it is.
- fsdp (FSDP2): parameters and optimizer state are DTensor shards. The trainable tensors are gathered with
  `full_tensor()`; the optimizer state with torch.distributed.checkpoint's `get_optimizer_state_dict(...,
  full_state_dict=True)` (one full, name-keyed dict on the main process), restored on every process with
  `set_optimizer_state_dict`, which re-shards it.
- zero2/zero3 (DeepSpeed): ZeRO keeps fp32 master weights and optimizer state in flat per-process partitions
  that only the engine can read back; every process writes its shard with `engine.save_checkpoint` (frozen
  base weights excluded) and `engine.load_checkpoint` restores it. ZeRO-3's partitioned parameters are
  gathered with `deepspeed.zero.GatheredParameters` for the adapter file.
All of these are collectives: every process calls them, in the same order.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

ENGINE_TAG = "engine"  # = checkpoint.ENGINE_DIR: the tag directory is moved in as is


def _is_dtensor(tensor: Any) -> bool:
    return hasattr(tensor, "full_tensor")


def gather_full(strategy: str, model: Any, named: dict[str, Any]) -> dict[str, Any]:
    """`named` (name -> parameter or buffer of the unwrapped model) with each tensor whole, on the CPU."""
    if strategy == "zero3":
        import deepspeed

        params = [t for t in named.values() if hasattr(t, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: t.detach().cpu().clone() for k, t in named.items()}
    out = {}
    for key, tensor in named.items():
        tensor = tensor.detach()
        out[key] = (tensor.full_tensor() if _is_dtensor(tensor) else tensor).cpu()
    return out


def optimizer_state_to_save(run: Any) -> dict | None:
    """The optimizer state the main process writes to optimizer.pt (None elsewhere, and under DeepSpeed)."""
    if run.deepspeed:
        return None
    if run.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_optimizer_state_dict(run.model, run.optimizer.optimizer, options=options)
        return full if run.main else None
    return run.optimizer.state_dict() if run.main else None


def load_optimizer_state(run: Any, state: dict | None) -> None:
    if run.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(run.model, run.optimizer.optimizer, state, options=options)
    else:
        run.optimizer.load_state_dict(state)


def load_trainable(run: Any, tensors: dict[str, Any]) -> None:
    """Copy whole saved tensors into the (possibly sharded) trainable parameters and buffers."""
    import torch

    model = run.accelerator.unwrap_model(run.model)
    targets = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    with torch.no_grad():
        for key, value in tensors.items():
            target = targets[key]
            if _is_dtensor(target):
                from torch.distributed.tensor import distribute_tensor

                local = target.to_local()
                value = value.to(device=local.device, dtype=local.dtype)
                value = distribute_tensor(value, target.device_mesh, target.placements)
                local.copy_(value.to_local())
            else:
                target.copy_(value)


def save_engine(run: Any, staging: Path) -> None:
    """Every process writes its ZeRO shard under `staging` (one shared directory; see state.write_checkpoint)."""
    if run.main and staging.exists():
        shutil.rmtree(staging)  # a stale one from a killed run
    run.accelerator.wait_for_everyone()
    run.model.save_checkpoint(str(staging), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)


def load_engine(run: Any, engine_dir: Path) -> None:
    """Restore a ZeRO checkpoint: the optimizer shards and the fp32 master weights of the trainable tensors
    (the frozen base was never saved, so the module loads non-strictly)."""
    from abba_cli.errors import UserError

    path, _ = run.model.load_checkpoint(
        str(engine_dir.parent),  # DeepSpeed reads <load_dir>/<tag>/
        tag=ENGINE_TAG,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    if path is None:
        raise UserError(
            f"{engine_dir}: the DeepSpeed engine checkpoint could not be read; resume from an older one"
        )
