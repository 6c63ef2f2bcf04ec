"""`abba export --format peft-lora --rank K`: the best rank-K approximation of each layer's exact update.

An ABBA layer is exactly the rank-R LoRA B* A* (R = r1·r2, export.py); LoRA servers want R small (vLLM
pre-allocates --max-lora-rank). By Eckart-Young the best rank-K approximation in Frobenius norm keeps the top K
singular triplets of dW, with relative error sqrt(sum_{i>K} σ_i²) / sqrt(sum_i σ_i²). The SVD is the factored
one of adapters/factors.py (never an (m, n) matrix); the kept triplets are split evenly between the factors,
like PEFT's own SVD paths: B_K = U_K Σ_K^½, A_K = Σ_K^½ V_Kᵀ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from abba_cli.adapters.factors import factored_svd


@dataclass
class Truncated:
    B: torch.Tensor  # (m, K) float64
    A: torch.Tensor  # (K, n) float64
    rel_error: float  # ||dW - B A||_F / ||dW||_F, from the discarded singular values
    kept: int  # singular values kept (K, or fewer when the layer's rank is lower)


def svd_truncate(B: torch.Tensor, A: torch.Tensor, k: int) -> Truncated:
    """The best rank-k factors of B @ A (B (m, R), A (R, n)); zero-padded to exactly k when rank(B A) < k."""
    svd = factored_svd(B, A)
    kept = min(k, svd.sigma.numel())
    root = svd.sigma[:kept].sqrt()
    b = svd.left[:, :kept] * root  # (m, kept)
    a = root[:, None] * svd.right[:kept]  # (kept, n)
    if kept < k:  # zero columns of B meet zero rows of A: the product is unchanged (peft_format.pad_rank)
        b = torch.cat([b, b.new_zeros(b.shape[0], k - kept)], dim=1)
        a = torch.cat([a, a.new_zeros(k - kept, a.shape[1])], dim=0)
    energy = float((svd.sigma**2).sum())
    tail = float((svd.sigma[kept:] ** 2).sum())
    return Truncated(b, a, math.sqrt(tail / energy) if energy > 0 else 0.0, kept)


def logit_change(
    base: str,
    run_dir,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scaling: float,
    model_settings: dict | None = None,
) -> dict[str, float]:
    """Logits on merge's check prompts: base + the exact adapter (our own layers, loaded from run_dir) against
    base + `factors` as a LoRA of scale `scaling`. Returns max |Δ|, and that relative to the adapter's own
    effect max |exact - base| (1.0 would mean the truncation changes the logits as much as the whole adapter)."""
    from abba_cli.adapters import load_adapter
    from abba_cli.adapters.inject import adapter_layers, inject_adapters, remove_adapters
    from abba_cli.config import AdapterConfig
    from abba_cli.models.loading import load_base
    from abba_cli.ship.logit_check import CHECK_PROMPTS, prompt_logits

    model, tokenizer = load_base(base, "auto", **(model_settings or {}))
    model.eval()
    originals = dict(model.named_modules())
    base_logits = prompt_logits(model, tokenizer, CHECK_PROMPTS)
    load_adapter(model, run_dir)
    exact = prompt_logits(model, tokenizer, CHECK_PROMPTS)
    remove_adapters(model, originals)
    k = next(iter(factors.values()))[0].shape[1]
    cfg = AdapterConfig(type="lora", r=k, alpha=float(k), target_modules=sorted(factors))
    inject_adapters(model, cfg, init=False, scaling=scaling)
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            b, a = factors[name]
            layer.B.copy_(b.to(layer.B.dtype))
            layer.A.copy_(a.to(layer.A.dtype))
    model.eval()
    got = prompt_logits(model, tokenizer, CHECK_PROMPTS)
    change = max(float((e - g).abs().max()) for e, g in zip(exact, got, strict=True))
    effect = max(float((e - b).abs().max()) for e, b in zip(exact, base_logits, strict=True))
    return {
        "prompts": len(CHECK_PROMPTS),
        "max_abs_change": change,
        "adapter_effect": effect,
        "change_vs_effect": change / effect if effect > 0 else float("inf"),
    }
