"""`abba compare` with DoRA and LoRA-Pro: both at LoRA's rank at the budget, DoRA's magnitudes counted apart."""

from __future__ import annotations

from pathlib import Path

from abba_cli.analysis.compare.budget import format_budget, plan_methods
from abba_cli.config import validate_config

# q_proj is 64 x 64 and v_proj 32 x 64 in the tiny Llama, 2 blocks: m + n summed, and m (output rows) summed.
SUM_M_N = 2 * (128 + 96)
SUM_M = 2 * (64 + 32)


def _raw(model_dir: Path, adapter: dict) -> dict:
    return {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "adapter": {"target_modules": ["q_proj", "v_proj"], **adapter},
        "data": {"recipe": "gsm8k_bundled_train", "num_samples": 8, "val_samples": 4},
        "train": {"max_steps": 2},
        "eval": {"tasks": ["boolq"], "limit": 2},
        "output_dir": "unused",
    }


def test_dora_and_lora_pro_at_the_budget_with_the_magnitudes_printed(tiny_model_dir):
    raw = _raw(tiny_model_dir, {"type": "abba", "r1": 2, "r2": 3})
    plans = plan_methods(raw, "cmp.yaml", ["abba", "lora", "dora", "lora_pro"], {})
    by = {p.method: p for p in plans}
    assert by["lora"].trainable == by["lora_pro"].trainable == by["abba"].trainable == 5 * SUM_M_N
    assert by["dora"].trainable == 5 * SUM_M_N + SUM_M and by["dora"].extra == SUM_M
    assert (by["dora"].cfg.adapter.type, by["dora"].cfg.adapter.r) == ("dora", 5)
    assert (by["lora_pro"].cfg.adapter.type, by["lora_pro"].cfg.adapter.r) == ("lora_pro", 5)
    text = format_budget(plans, validate_config(raw))
    assert f"{5 * SUM_M_N + SUM_M:,}" in text and f"+{SUM_M:,} magnitude parameters" in text


def test_a_dora_config_sets_the_budget_by_its_rank(tiny_model_dir):
    raw = _raw(tiny_model_dir, {"type": "dora", "r": 4, "alpha": 3.0})
    by = {p.method: p for p in plan_methods(raw, "cmp.yaml", ["dora", "abba", "lora"], {})}
    assert by["abba"].trainable == by["lora"].trainable == 4 * SUM_M_N
    assert by["dora"].trainable == 4 * SUM_M_N + SUM_M and by["dora"].cfg.adapter.alpha == 3.0
