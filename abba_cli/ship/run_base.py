"""How a shipped run's base model loads: the settings the run trained with, read from its config.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from abba_cli.errors import UserError


def run_model_config(run_dir: Path) -> Any | None:
    """The run's `model:` section (run/layout's reader), or None when the run has no readable config.yaml: the
    base then loads with the defaults."""
    from abba_cli.run.layout import read_run_config

    try:
        cfg = read_run_config(run_dir)
    except UserError:
        return None
    return None if cfg is None else cfg.model


def run_load_settings(run_dir: Path) -> dict[str, Any]:
    """trust_remote_code / revision as the run loaded its base (models.loading.load_kwargs), so the base loads as
    it did for training. Not its dtype (merge loads the checkpoint's own and picks the output's itself), its
    attention kernel (irrelevant to the weights, and maybe unavailable here) nor its quantization (merge folds
    into the unquantized base)."""
    from abba_cli.models.loading import load_kwargs

    model = run_model_config(run_dir)
    if model is None:
        return {}
    return {k: v for k, v in load_kwargs(model).items() if k in ("trust_remote_code", "revision")}


def run_quantization(run_dir: Path) -> dict[str, Any] | None:
    """{quantization, double_quant} when the run trained on a bitsandbytes-quantized base, else None."""
    model = run_model_config(run_dir)
    if model is None or model.quantization == "none":
        return None
    return {"quantization": model.quantization, "double_quant": model.double_quant}
