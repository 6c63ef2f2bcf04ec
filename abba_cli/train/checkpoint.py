"""Training checkpoints (saved and loaded here; found by run/layout.py): everything needed to continue a run bit for bit.

RUN_DIR/checkpoints/step-N/ holds
    adapter_model.safetensors   the trainable adapter factors (fp32), keyed like the run's final adapter
    optimizer.pt, scheduler.pt  their state_dicts (under FSDP2 the full optimizer state, keyed by parameter name)
    engine/                     DeepSpeed ZeRO only, instead of optimizer.pt: the engine's own checkpoint (one
                                optimizer-state shard per process, the trainable fp32 weights), written by every
                                process and restored by `engine.load_checkpoint`
    rng.pt                      python / numpy / torch (and CUDA) RNG states, one entry per process
    state.json                  step, data position (epoch, batch index in that epoch), elapsed seconds
Each directory is built under a temporary name and renamed when complete (fsutil.atomic_directory), so any
`step-N` that exists is whole: a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from abba_cli.errors import UserError
from abba_cli.run.layout import (
    ADAPTER_WEIGHTS,
    CHECKPOINT_BEST_WEIGHTS,
    CHECKPOINT_STATE,
    CHECKPOINTS,
    list_checkpoints,
)
from abba_cli.util.files import atomic_directory, atomic_save_safetensors

ENGINE_DIR = "engine"  # a DeepSpeed engine's own checkpoint inside checkpoints/step-N


@dataclass
class TrainState:
    """Where the run stands after `step` optimizer steps (the data position is the next micro-batch to read)."""

    step: int
    epoch: int
    batch_in_epoch: int
    micro_batches_seen: int
    elapsed_s: float
    tokens_seen: int
    data_sha256: str | None = None  # the training examples' content hash (older checkpoints have none)
    val_tracker: dict | None = None  # early_stopping.ValTracker's state (older checkpoints have none)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        # A tensor instead of an ndarray, so rng.pt loads with torch.load(weights_only=True).
        state["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    except ImportError:  # numpy is optional for torch; nothing to save then
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    state: TrainState,
    adapter_tensors: dict[str, torch.Tensor],
    optimizer_state: dict | None,
    scheduler_state: dict,
    rng_states: list[dict[str, Any]],
    keep: int | None,
    engine_dir: Path | None = None,
    best_weights: Path | None = None,
) -> Path:
    """Write checkpoints/step-N atomically, then drop the oldest beyond `keep`. Main process only.

    `engine_dir` (DeepSpeed) is a finished engine checkpoint that is moved in as `engine/` instead of
    optimizer.pt; `best_weights` (train.keep_best) is RUN_DIR/best's adapter, copied in."""
    final = Path(run_dir) / CHECKPOINTS / f"step-{state.step}"
    with atomic_directory(final, overwrite=True) as tmp:
        atomic_save_safetensors(
            {k: v.detach().cpu() for k, v in adapter_tensors.items()}, tmp / ADAPTER_WEIGHTS
        )
        if engine_dir is not None:
            os.replace(engine_dir, tmp / ENGINE_DIR)
        if best_weights is not None:
            shutil.copyfile(best_weights, tmp / CHECKPOINT_BEST_WEIGHTS)
        if optimizer_state is not None:
            _torch_save(optimizer_state, tmp / "optimizer.pt")
        _torch_save(scheduler_state, tmp / "scheduler.pt")
        _torch_save(rng_states, tmp / "rng.pt")
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(asdict(state), indent=2) + "\n")
    if keep is not None:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    # A kill -9 mid-write leaves `.step-N.*.partial`; it is never read, but it would pile up on disk. Only one
    # process writes checkpoints, so any partial dir other than the one just renamed is stale.
    for stale in (Path(run_dir) / CHECKPOINTS).glob(".step-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file: a full disk is then an OSError (ENOSPC) that names itself. Given a
    path, torch's C++ writer reports it as "RuntimeError: [enforce fail at inline_container.cc] unexpected
    pos", which no handler can tell from a bug."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(
    path: str | Path,
) -> tuple[TrainState, dict[str, torch.Tensor], dict | None, dict, list[dict]]:
    """(state, adapter tensors, optimizer state (None when the DeepSpeed engine holds it: `engine/`), scheduler
    state, per-process RNG states)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = TrainState(**json.loads((path / CHECKPOINT_STATE).read_text()))
        tensors = load_file(path / ADAPTER_WEIGHTS)
        # weights_only=True: a checkpoint is data, never code; a pickle holding an arbitrary object is refused.
        optimizer_state = (
            None
            if (path / ENGINE_DIR).is_dir()
            else torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        )
        scheduler_state = torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True)
        rng_states = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, TypeError, RuntimeError, pickle.UnpicklingError) as err:
        raise UserError(
            f"{path}: unreadable checkpoint ({err}); delete it to resume from an older one"
        ) from None
    return state, tensors, optimizer_state, scheduler_state, rng_states
