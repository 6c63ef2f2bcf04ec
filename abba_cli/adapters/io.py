"""The adapter files of a run directory (ARCHITECTURE.md section 3).

adapter_config.json: type, ranks, alpha, the numeric scaling s actually applied, target modules, base model,
package version. adapter_model.safetensors: fp32 tensors `<module path>.<factor>` so anyone can recompute
dW = s * (B1@A1) * (B2@A2) (ABBA) or s * B@A (LoRA, LoRA-Pro) or s * W0 * (B@A) (HiRA), or
W' = m * (W0 + s B@A) / ||W0 + s B@A|| per output row (DoRA, m its magnitude vector).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from abba_cli import __version__
from abba_cli.adapters.inject import (
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    remove_adapters,
    scaling_for,
)
from abba_cli.adapters.peft_format import config_from_peft, is_peft_config, to_our_tensors
from abba_cli.config import AdapterConfig
from abba_cli.errors import UserError
from abba_cli.run.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG_FILE,
    base_model_reference,
    read_adapter_tensors,
    read_run_config,
    run_files,
)
from abba_cli.util.files import atomic_save_safetensors, atomic_write_json

FORMAT = "abba-cli-adapter"
ADAPTER_TYPES = ("abba", "lora", "hira", "dora", "lora_pro")


def adapter_config_dict(model: nn.Module | None, cfg: AdapterConfig, base_model: str) -> dict:
    """adapter_config.json's content (`model` None: without the list of adapted modules)."""
    if cfg.type == "abba":
        ranks = {"ranks": list(cfg.ranks)} if cfg.ranks is not None else {"r1": cfg.r1, "r2": cfg.r2}
    else:
        ranks = {"r": cfg.r}
    return {
        "format": FORMAT,
        "abba_cli_version": __version__,
        "type": cfg.type,
        **ranks,
        "alpha": cfg.alpha,
        "scaling": scaling_for(cfg),
        "scaling_convention": cfg.scaling
        if cfg.type == "abba"
        else ("rslora" if cfg.use_rslora else "alpha/r"),
        "dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "init": cfg.init,
        "use_rslora": cfg.use_rslora,
        "path": cfg.path,
        "base_model": base_model,
        "adapted_modules": [name for name, _ in adapter_layers(model)] if model is not None else None,
    }


def save_adapter(
    model: nn.Module,
    cfg: AdapterConfig,
    out_dir: str | Path,
    base_model: str,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write adapter_config.json and adapter_model.safetensors (fp32, contiguous, on CPU), each atomically.

    `tensors` overrides the model's own factors: under FSDP / ZeRO-3 the local parameters are shards, and the
    caller passes the gathered full tensors instead. `base_model` is a hub id or a local folder; a folder is
    stored as an absolute path, so that `abba eval`/`merge`/`export` find it from any working directory.
    """
    out_dir = Path(out_dir)
    if base_model and Path(base_model).expanduser().is_dir():  # "" (no base recorded) is not the cwd
        base_model = str(Path(base_model).expanduser().resolve())
    tensors = {
        k: v.float().cpu() for k, v in (tensors if tensors is not None else adapter_state_dict(model)).items()
    }
    atomic_save_safetensors(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt", "producer": FORMAT})
    atomic_write_json(out_dir / ADAPTER_CONFIG, adapter_config_dict(model, cfg, base_model))


def read_adapter_config(run_dir: str | Path) -> dict:
    """RUN_DIR/adapter_config.json, validated; for a checkpoint, its run's (derived from config.yaml when the
    run never finished)."""
    files = run_files(run_dir)
    path = files.adapter_config
    if not path.is_file() and files.checkpoint is not None:
        return _checkpoint_adapter_config(files.root)
    if not path.is_file():
        raise UserError(f"{path}: missing; an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if is_peft_config(data):
        return config_from_peft(data, str(path))  # a PEFT LoRA/LoHa folder, read as our own (peft_format.py)
    if not isinstance(data, dict) or data.get("type") not in ADAPTER_TYPES:
        raise UserError(
            f'{path}: not an abba-cli adapter config (needs "type": one of {", ".join(ADAPTER_TYPES)})'
        )
    for key in ("alpha", "scaling", "target_modules"):
        if key not in data:
            raise UserError(f"{path}: missing key {key!r}")
    return data


def _checkpoint_adapter_config(root: Path) -> dict:
    """An unfinished run has no adapter_config.json yet: its config.yaml says what train would have written."""
    cfg = read_run_config(root)
    if cfg is None or cfg.adapter.type not in ADAPTER_TYPES:
        kind = "no config" if cfg is None else f"adapter.type {cfg.adapter.type}"
        raise UserError(f"{root / CONFIG_FILE}: {kind}: its checkpoints hold no adapter")
    return adapter_config_dict(None, cfg.adapter, base_model_reference(cfg.model.name_or_path))


def adapter_config_from_dict(data: dict, source: str = ADAPTER_CONFIG) -> AdapterConfig:
    keys = [
        "type",
        "r1",
        "r2",
        "r",
        "ranks",
        "alpha",
        "dropout",
        "target_modules",
        "init",
        "use_rslora",
        "path",
    ]
    fields = {k: data[k] for k in keys if data.get(k) is not None}
    if data.get("type") == "abba" and data.get("scaling_convention") in ("paper", "released"):
        fields["scaling"] = data["scaling_convention"]
    try:
        return AdapterConfig(**fields)
    except Exception as e:  # pydantic ValidationError: the file was edited or is from another tool
        raise UserError(f"{source}: invalid adapter settings: {e}".splitlines()[0]) from None


def load_adapter(model: nn.Module, run_dir: str | Path) -> AdapterConfig:
    """Inject the adapter described by run_dir/adapter_config.json into `model` and load its weights.

    Shape or key mismatches (an adapter trained on another base model) are UserErrors naming the keys.
    """
    run_dir = Path(run_dir)
    data = read_adapter_config(run_dir)
    files = run_files(run_dir)
    # A PEFT folder's tensors are renamed to ours, which also names the exact modules to adapt in `data`.
    tensors = to_our_tensors(data, read_adapter_tensors(files.weights), files.weights)
    cfg = adapter_config_from_dict(data, str(files.adapter_config))
    originals = dict(model.named_modules())
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    try:
        inject_adapters(model, cfg, init=False, scaling=float(data["scaling"]))
    except UserError as e:
        raise UserError(f"{run_dir}: adapter does not fit this model: {e}") from None
    try:
        _fill_adapter(model, tensors, files.weights, data)
    except BaseException:
        # Leave the model as it came: a caller that catches the error must not find half an adapter in it.
        remove_adapters(model, originals)
        for p in model.parameters():
            p.requires_grad_(requires_grad.get(id(p), p.requires_grad))
        raise
    return cfg


def _fill_adapter(model: nn.Module, tensors: dict[str, torch.Tensor], weights: Path, data: dict) -> None:
    """Copy the stored factors into the injected layers; UserError naming any key or shape that does not fit."""
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{weights}: keys do not match this model (trained on another base model?): "
            f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"
        )
    for key, target in expected.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            base = data.get("base_model", "?")
            raise UserError(
                f"{weights}: {key} has shape {tuple(tensors[key].shape)} but this model needs "
                f"{tuple(target.shape)}: the adapter was trained on another base model ({base})"
            )
    bad = [
        k for k in expected if tensors[k].is_floating_point() and not bool(torch.isfinite(tensors[k]).all())
    ]
    if bad:
        # Caught here, not when the merge finds a non-finite layer: this names the run's file, as merge does.
        raise UserError(
            f"{weights}: {bad[0]} holds NaN or infinite values ({len(bad)} tensor(s); the run diverged?); "
            "use an earlier checkpoint (--run RUN_DIR/checkpoints/step-N)"
        )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(target.device, target.dtype))
