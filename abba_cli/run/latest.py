"""Which run a command means: `eval`, `merge` and `export` default to the latest finished run.

The latest run is recorded as an absolute path in `$ABBA_HOME/latest_run` (default
`~/.cache/abba-cli`), written when `abba train` finishes. `--run` may also name one of a run's checkpoints,
RUN_DIR/checkpoints/step-N: its factors with the run's adapter settings (RUN_DIR/adapter_config.json, or for a
run that never finished, the adapter section of RUN_DIR/config.yaml).
"""

from __future__ import annotations

from pathlib import Path

from abba_cli.errors import UserError
from abba_cli.run.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG_FILE,
    abba_home,
    checkpoint_root,
    full_model_dir,
    run_files,
)
from abba_cli.util.files import atomic_write_text


def record_latest(run_dir: str | Path) -> None:
    atomic_write_text(abba_home() / "latest_run", str(Path(run_dir).resolve()) + "\n")


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
    if checkpoint_root(run_dir) is not None:
        return _check_checkpoint(run_dir)
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


def _check_checkpoint(path: Path) -> Path:
    files = run_files(path)
    if not files.weights.is_file():
        raise UserError(f"--run {path}: checkpoint without {ADAPTER_WEIGHTS}")
    if not files.adapter_config.is_file() and not (files.root / CONFIG_FILE).is_file():
        raise UserError(
            f"--run {path}: neither {files.adapter_config} nor {files.root / CONFIG_FILE} says which adapter "
            "it holds"
        )
    return path


def recorded_base(run_dir: Path, base: str, override: str | Path | None) -> str:
    """The base model to load: `override` (--base) if given, else the one the run recorded, which must exist
    when it is a local path. UserError naming where the path came from otherwise."""
    source = run_files(run_dir)
    where = source.adapter_config if source.adapter_config.is_file() else source.root / CONFIG_FILE
    if override is not None:
        path = Path(override).expanduser()
        if not path.is_dir():
            raise UserError(f"--base {override}: no such model directory")
        return str(path.resolve())
    if not base:
        raise UserError(f"{where}: no base_model recorded; pass --base PATH")
    if base.startswith(("/", "~", ".")) and not Path(base).expanduser().is_dir():
        raise UserError(
            f"base model {base} (recorded in {where}) no longer exists; pass --base PATH to use another copy"
        )
    return base
