"""Finding run directories: `eval`, `merge` and `export` default to the latest finished run.

The latest run is recorded as an absolute path in `$ABBA_HOME/latest_run` (default
`~/.cache/abba-cli`), written when `abba train` finishes.
"""

from __future__ import annotations

import os
from pathlib import Path

from abba_cli.errors import UserError
from abba_cli.fsutil import atomic_write_text

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# A full fine-tuning run (adapter.type full) holds the trained model itself, as a plain Hugging Face folder.
FULL_MODEL_DIR = "model"


def abba_home() -> Path:
    return Path(os.environ.get("ABBA_HOME") or Path.home() / ".cache" / "abba-cli")


def record_latest(run_dir: str | Path) -> None:
    atomic_write_text(abba_home() / "latest_run", str(Path(run_dir).resolve()) + "\n")


def full_model_dir(run_dir: str | Path) -> Path | None:
    """RUN_DIR/model when RUN_DIR is a finished full fine-tuning run, else None."""
    path = Path(run_dir) / FULL_MODEL_DIR
    return path if (path / "config.json").is_file() else None


def resolve_run(run: str | Path | None, allow_full: bool = False) -> Path:
    """The run directory to use: the one given, else the latest finished run. UserError if unusable.

    A full fine-tuning run has no adapter: it is accepted only with `allow_full` (evaluation); merge and export
    get a UserError pointing at the model folder, which is already what they would produce.
    """
    if run is None:
        marker = abba_home() / "latest_run"
        if not marker.is_file():
            raise UserError(
                "no run given and no finished run recorded: pass --run RUN_DIR (or train one first)"
            )
        try:
            recorded = marker.read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError:
            recorded = ""
        if not recorded:
            raise UserError(
                f"{marker}: the latest-run record is empty or not UTF-8 text; pass --run RUN_DIR "
                "(the next finished `abba train` rewrites it)"
            )
        run_dir = Path(recorded)
        if not run_dir.is_dir():
            raise UserError(f"the latest recorded run {run_dir} no longer exists: pass --run RUN_DIR")
    else:
        run_dir = Path(run)
        if not run_dir.is_dir():
            raise UserError(f"--run {run}: no such run directory")
    model_dir = full_model_dir(run_dir)
    if model_dir is not None:
        if allow_full:
            return run_dir
        raise UserError(
            f"{run_dir} is a full fine-tuning run (adapter.type full): it has no adapter to merge or export; "
            f"the trained model is already a plain Hugging Face folder at {model_dir}"
        )
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (run_dir / name).is_file():
            raise UserError(
                f"{run_dir}: missing {name}; a finished run directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
            )
    return run_dir
