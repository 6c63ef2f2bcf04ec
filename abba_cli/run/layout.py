"""The run directory's layout, owned here: its file names, where a run's adapter and checkpoints live, and
the one way each run file is read (config.yaml, the adapter safetensors). train, eval, merge and export all go
through this module; nothing else spells a run file's name.

    RUN_DIR/adapter_config.json, adapter_model.safetensors   the adapter (adapters/io.py writes them)
    RUN_DIR/model/                                         a full fine-tuning run's trained model
    RUN_DIR/config.yaml                                    the resolved run config
    RUN_DIR/metrics.jsonl, val_summary.json                the training log, the validation summary
    RUN_DIR/checkpoints/step-N/                            exact-resume state (train/checkpoint.py)
    RUN_DIR/eval/<task>/                                   a task's results (eval/results.py owns its files)
    RUN_DIR/best/                                          train.keep_best: the lowest val_loss's adapter, with
                                                           adapter_config.json and config.yaml (a run dir itself)
    RUN_DIR/.lock                                          held while a run trains (run/training_dir.py)
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abba_cli.errors import UserError

if TYPE_CHECKING:
    import torch

    from abba_cli.config import RunConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# A full fine-tuning run (adapter.type full) holds the trained model itself, as a plain Hugging Face folder.
FULL_MODEL_DIR = "model"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
VAL_SUMMARY_FILE = "val_summary.json"
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
BEST_DIR = "best"
# A checkpoint's copy of RUN_DIR/best as it was then: a resume puts it back (train/early_stopping.py).
CHECKPOINT_BEST_WEIGHTS = "best_adapter_model.safetensors"
CHECKPOINT_STATE = "state.json"  # written last into a checkpoint: a step-N holding it is complete
_CHECKPOINT_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class RunFiles:
    """Where a run's adapter lives: `root` is the run directory, `weights` its factors or a checkpoint's."""

    root: Path
    weights: Path
    checkpoint: Path | None = None

    @property
    def adapter_config(self) -> Path:
        return self.root / ADAPTER_CONFIG


def checkpoint_root(path: str | Path) -> Path | None:
    """RUN_DIR when `path` is RUN_DIR/checkpoints/step-N (a complete one), else None."""
    path = Path(path)
    if (
        path.parent.name == CHECKPOINTS
        and _CHECKPOINT_DIR.match(path.name)
        and (path / CHECKPOINT_STATE).is_file()
    ):
        return path.parent.parent
    return None


def run_files(path: str | Path) -> RunFiles:
    path = Path(path)
    root = checkpoint_root(path)
    if root is None:
        return RunFiles(path, path / ADAPTER_WEIGHTS)
    return RunFiles(root, path / ADAPTER_WEIGHTS, path)


def full_model_dir(run_dir: str | Path) -> Path | None:
    """RUN_DIR/model when RUN_DIR is a finished full fine-tuning run, else None."""
    path = Path(run_dir) / FULL_MODEL_DIR
    return path if (path / "config.json").is_file() else None


def abba_home() -> Path:
    """abba-cli's own folder ($ABBA_HOME, default ~/.cache/abba-cli): the latest-run record and the data cache."""
    return Path(os.environ.get("ABBA_HOME") or Path.home() / ".cache" / "abba-cli")


def base_model_reference(name_or_path: str) -> str:
    """What adapter_config.json records as the base: an absolute path for a local directory (so eval and merge
    work from any working directory), the hub id otherwise."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


# ----------------------------------------------------------------------------------------------- reading


def is_run_dir(path: str | Path) -> bool:
    """An adapter run (its adapter config) or a full fine-tuning run (its model folder)."""
    return (Path(path) / ADAPTER_CONFIG).is_file() or (Path(path) / FULL_MODEL_DIR).is_dir()


def has_final_output(run_dir: str | Path) -> bool:
    """The final adapter (or, for full fine-tuning, the model) is saved: training is over."""
    run_dir = Path(run_dir)
    adapter = (run_dir / ADAPTER_WEIGHTS).is_file() and (run_dir / ADAPTER_CONFIG).is_file()
    return adapter or full_model_dir(run_dir) is not None


def read_metrics_records(run_dir: str | Path) -> list[dict]:
    """RUN_DIR/metrics.jsonl, one dict per logged step ([] before the first)."""
    import json

    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_val_summary(run_dir: str | Path) -> dict | None:
    """RUN_DIR/val_summary.json (None when the run did not validate)."""
    import json

    path = Path(run_dir) / VAL_SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def refuse_run_dir_as_config(path: Path) -> None:
    """`abba train RUN_DIR`: a run directory where a config file belongs is one line pointing at its config."""
    saved = Path(path) / CONFIG_FILE
    if Path(path).is_dir() and saved.is_file():
        raise UserError(
            f"{path} is a directory, not a config file; pass {saved} (the run's saved config; with --resume to "
            "continue that run)"
        )


def read_run_config(run_dir: str | Path) -> RunConfig | None:
    """RUN_DIR/config.yaml as a validated RunConfig (None when the run has none). UserError if it is broken."""
    from abba_cli.config import load_config

    path = Path(run_dir) / CONFIG_FILE
    return load_config(path) if path.is_file() else None


def read_saved_config(run_dir: Path) -> dict:
    """RUN_DIR/config.yaml as a plain mapping, for comparing a --resume config key by key; a broken file is one
    line naming it."""
    import yaml

    path = run_dir / CONFIG_FILE
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(
            f"--resume: {path}: YAML syntax error{where}: {getattr(e, 'problem', None) or e}; "
            "the run's saved config must be fixed (or restored) before it can resume"
        ) from None
    except UnicodeDecodeError as e:
        raise UserError(f"--resume: {path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {path}: expected a mapping of config sections")
    return saved


def read_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    """An adapter safetensors file (a run's or a checkpoint's); UserError when missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path}: missing; an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable or corrupt safetensors file ({e})") from None


# ----------------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary `.step-N.*.partial` dirs never match)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _CHECKPOINT_DIR.match(child.name)
        if m and child.is_dir() and (child / CHECKPOINT_STATE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def last_finite_checkpoint(run_dir: str | Path, before_step: int) -> Path | None:
    """The newest complete checkpoint written before `before_step` whose weights and optimizer state are all
    finite: the one to resume from after a divergence (a newer one may hold the overflow that caused it)."""
    import torch
    from safetensors.torch import load_file

    for step, path in reversed(list_checkpoints(run_dir)):
        if step >= before_step:
            continue
        try:
            tensors: list[Any] = list(load_file(path / ADAPTER_WEIGHTS).values())
            # A DeepSpeed checkpoint keeps its optimizer shards in engine/: its adapter tensors are checked.
            optimizer = (
                torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
                if (path / "optimizer.pt").is_file() or not (path / "engine").is_dir()
                else {}
            )
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError):
            continue  # unreadable: not a checkpoint to recommend
        tensors += [t for s in optimizer.get("state", {}).values() for t in s.values() if torch.is_tensor(t)]
        if all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
            return path
    return None
