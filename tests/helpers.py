"""Helpers shared by several test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from abba_cli.adapters import adapter_layers, inject_adapters, save_adapter
from abba_cli.config import AdapterConfig

PROMPTS = ["The answer is: 42", "Natalia sold clips to 48 of her friends in April."]


def make_run(run_dir: Path, base_dir: Path, seed: int = 0, **adapter) -> Path:
    """A run directory built with the adapter API on `base_dir`, factors random so that dW != 0."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter.get("type", "abba") == "abba":
        # Random factors of 0.3 already give a large dW; at the default alpha 16 (s = 256 / sqrt(r1 r2)) it
        # would swamp W0 and the fp32 round-off of merge checks. alpha 4 keeps dW the size of W0.
        adapter.setdefault("alpha", 4.0)
    cfg = AdapterConfig(**adapter)
    inject_adapters(model, cfg, init=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.factors().values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    save_adapter(model, cfg, run_dir, base_model=str(base_dir))
    return run_dir


def logits(model, tok_dir: Path) -> list[torch.Tensor]:
    """Logits of every PROMPTS entry (fp32), one prompt at a time, so no padding is involved."""
    tok = AutoTokenizer.from_pretrained(tok_dir)
    with torch.inference_mode():
        return [model(**tok(p, return_tensors="pt")).logits[0].float() for p in PROMPTS]


def max_rel(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Largest absolute difference relative to the reference logits' scale."""
    scale = max(float(r.abs().max()) for r in ref)
    return max(float((r - g).abs().max()) for r, g in zip(ref, got, strict=True)) / scale


def ours_vs_peft(base_dir: Path, run_dir: Path, export_dir: Path) -> tuple[float, float]:
    """(relative diff ours vs PEFT, relative effect of the adapter vs the bare base) on PROMPTS, fp32."""
    from peft import PeftModel

    from abba_cli.adapters import load_adapter

    ours = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    load_adapter(ours, run_dir)
    ref = logits(ours, base_dir)
    base = logits(AutoModelForCausalLM.from_pretrained(base_dir).eval(), base_dir)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), export_dir).eval()
    return max_rel(ref, logits(peft_model, base_dir)), max_rel(ref, base)


def load_benchmark(name: str):
    """Import benchmarks/<name>.py (a folder of scripts, not a package) as a module."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(mod)
    return mod
