"""Helpers shared by several test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from abba_cli.adapters import adapter_layers, inject_adapters, save_adapter
from abba_cli.config import AdapterConfig


def make_run(run_dir: Path, base_dir: Path, seed: int = 0, **adapter) -> Path:
    """A run directory built with the adapter API on `base_dir`, factors random so that dW != 0."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = AdapterConfig(**adapter)
    inject_adapters(model, cfg, init=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.factors().values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    save_adapter(model, cfg, run_dir, base_model=str(base_dir))
    return run_dir
