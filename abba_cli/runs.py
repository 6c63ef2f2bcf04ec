"""Finding and reading run directories: `eval`, `merge` and `export` default to the latest finished run.

The latest run is recorded as an absolute path in `$ABBA_HOME/latest_run` (default
`~/.cache/abba-cli`), written when `abba train` finishes. `--run` may also name one of a run's checkpoints,
RUN_DIR/checkpoints/step-N: its factors with the run's adapter settings (RUN_DIR/adapter_config.json, or for a
run that never finished, the adapter section of RUN_DIR/config.yaml).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from abba_cli.errors import UserError
from abba_cli.fsutil import atomic_write_text

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# A full fine-tuning run (adapter.type full) holds the trained model itself, as a plain Hugging Face folder.
FULL_MODEL_DIR = "model"
CONFIG_FILE = "config.yaml"
_CHECKPOINT_DIR = re.compile(r"^step-\d+$")


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
        path.parent.name == "checkpoints"
        and _CHECKPOINT_DIR.match(path.name)
        and (path / "state.json").is_file()
    ):
        return path.parent.parent
    return None


def run_files(path: str | Path) -> RunFiles:
    path = Path(path)
    root = checkpoint_root(path)
    if root is None:
        return RunFiles(path, path / ADAPTER_WEIGHTS)
    return RunFiles(root, path / ADAPTER_WEIGHTS, path)


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


FACTORS = {"abba": ("B1", "A1", "B2", "A2"), "lora": ("A", "B"), "hira": ("A", "B")}
# PiSSA-initialised LoRA runs also store the initial factors: the update to the original W0 is s(BA - B0A0).
OPTIONAL_FACTORS = {"lora": ("A0", "B0")}


@dataclass
class RunAdapter:
    """A run's adapter as stored on disk: its config and its fp32 factors grouped by module path."""

    run_dir: Path  # as given: the run, or one of its checkpoints
    root: Path  # the run directory itself (config.yaml)
    weights: Path  # the safetensors file the factors came from
    config: dict
    type: str
    scaling: float
    base_model: str
    factors: dict[str, dict[str, torch.Tensor]]

    def out_in_features(self, module: str) -> tuple[int, int]:
        """(m, n) of the adapted layer, from B1/A1 (ABBA) or B/A (LoRA, HiRA)."""
        f = self.factors[module]
        b, a = (f["B1"], f["A1"]) if self.type == "abba" else (f["B"], f["A"])
        return b.shape[0], a.shape[1]


def read_run_adapter(run: str | Path | None) -> RunAdapter:
    """Read RUN_DIR/adapter_config.json and the factors; UserError for anything inconsistent."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from abba_cli.adapters import read_adapter_config

    run_dir = resolve_run(run)
    files = run_files(run_dir)
    cfg = read_adapter_config(run_dir)
    kind = cfg.get("type")
    if kind not in FACTORS:
        raise UserError(f"{files.adapter_config}: type {kind!r} is not one of {', '.join(FACTORS)}")
    scaling = cfg.get("scaling")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise UserError(f"{files.adapter_config}: 'scaling' must be the numeric scale s, got {scaling!r}")
    try:
        tensors = load_file(str(files.weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{files.weights}: unreadable or corrupt safetensors file ({e})") from None
    from abba_cli.adapters.peft_format import to_our_tensors

    tensors = to_our_tensors(cfg, tensors, files.weights)  # a PEFT LoRA/LoHa folder; ours pass unchanged
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, name = key.rpartition(".")
        allowed = FACTORS[kind] + OPTIONAL_FACTORS.get(kind, ())
        if name not in allowed or not module:
            raise UserError(
                f"{files.weights}: unexpected tensor {key!r}; a {kind} adapter stores "
                f"'<module>.{{{','.join(allowed)}}}'"
            )
        if not torch.isfinite(t).all():
            raise UserError(
                f"{files.weights}: {key} holds NaN or infinite values (the run diverged?); "
                "nothing was written; use an earlier checkpoint (--run RUN_DIR/checkpoints/step-N)"
            )
        factors.setdefault(module, {})[name] = t.float()
    if not factors:
        raise UserError(f"{files.weights}: holds no adapter tensors")
    for module, f in factors.items():
        missing = [n for n in FACTORS[kind] if n not in f]
        if ("A0" in f) != ("B0" in f):
            missing.append("B0" if "A0" in f else "A0")
        if missing:
            raise UserError(f"{files.weights}: {module} lacks {', '.join(missing)}")
        _check_factor_shapes(files.weights, kind, module, f)
    base = str(cfg.get("base_model") or "")
    return RunAdapter(run_dir, files.root, files.weights, cfg, kind, float(scaling), base, factors)


def _check_factor_shapes(weights: Path, kind: str, module: str, f: dict[str, torch.Tensor]) -> None:
    where = f"{weights}: {module}"
    shapes = {k: tuple(v.shape) for k, v in f.items()}
    if any(len(s) != 2 for s in shapes.values()):
        raise UserError(f"{where}: factors must be matrices, got {shapes}")
    if kind == "abba":
        (m1, r1), (r1b, n1), (m2, r2), (r2b, n2) = (shapes[k] for k in ("B1", "A1", "B2", "A2"))
        ok = m1 == m2 and n1 == n2 and r1 == r1b and r2 == r2b
    else:
        ok = shapes["A"][0] == shapes["B"][1]
    if not ok:
        raise UserError(f"{where}: inconsistent factor shapes {shapes}")


def check_against_base(adapter: RunAdapter, model, base: str) -> None:
    """Refuse an adapter trained on another base: every adapted module must exist with the same (m, n).

    Works on a real model or one built on the meta device (only shapes are read).
    """
    import torch

    for module in adapter.factors:
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise UserError(
                f"the adapter in {adapter.run_dir} adapts {module}, which base model {base} does not have: "
                "was it trained on another base?"
            ) from None
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise UserError(f"base model {base}: {module} is not a linear layer, but the adapter adapts it")
        m, n = adapter.out_in_features(module)
        if tuple(weight.shape) != (m, n):
            raise UserError(
                f"the adapter in {adapter.run_dir} does not fit base model {base}: {module} is "
                f"{tuple(weight.shape)} (out, in) in the base but {(m, n)} in the adapter; "
                "was it trained on another base?"
            )
