"""configs/gpu80/: for each paper config, the variant for one 80 GB GPU trains the same thing (same model,
adapter, data and evaluation; the same effective batch) with the memory it is computed to need stated in its
comment and in the README, and that memory fits an 80 GB GPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from abba_cli.config import load_config
from benchmarks import quant_bench as bench

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = [
    "mistral_metamath",
    "gemma2-9b_metamath",
    "llama3.2-1b_commonsense",
    "llama3.2-3b_commonsense",
]
USABLE_GIB = 80e9 / 2**30 * 0.9  # an 80 GB card, less the CUDA context and the allocator's fragmentation


def _stated_gib(path: Path) -> float:
    found = re.findall(r"Computed to need ([\d.]+) GiB", path.read_text())
    assert len(found) == 1, path
    return float(found[0])


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_gpu_variant_trains_what_the_paper_config_trains(name):
    paper = load_config(ROOT / "configs" / f"{name}.yaml").model_dump()
    gpu = load_config(ROOT / "configs" / "gpu80" / f"{name}.yaml").model_dump()
    for section in ("model", "adapter", "eval", "distributed"):
        assert gpu[section] == paper[section], section
    assert {**gpu["data"], "group_by_length": False} == {**paper["data"], "group_by_length": False}
    assert gpu["data"]["group_by_length"] is True
    changed = {"micro_batch_size", "grad_accum_steps", "gradient_checkpointing"}
    assert {k: v for k, v in gpu["train"].items() if k not in changed} == {
        k: v for k, v in paper["train"].items() if k not in changed
    }
    p, g = paper["train"], gpu["train"]
    assert g["micro_batch_size"] * g["grad_accum_steps"] == p["micro_batch_size"] * p["grad_accum_steps"]
    assert g["micro_batch_size"] >= 4 and not g["gradient_checkpointing"]
    assert gpu["output_dir"] != paper["output_dir"]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_gpu_variant_states_the_memory_it_is_computed_to_need(name):
    path = ROOT / "configs" / "gpu80" / f"{name}.yaml"
    cfg = load_config(path)
    arch = next(v for k, v in bench.PAPER.items() if f"configs/{name}.yaml" in k)
    e = bench.estimate(arch[:8] + (cfg.train.micro_batch_size, cfg.data.max_seq_len, False))
    need = e["bf16_weights"] + e["adapter_adamw"] + e["activations"] + e["logits"]
    assert _stated_gib(path) == round(need, 1)
    assert need < USABLE_GIB
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"configs/gpu80/{re.escape(name)}\.yaml.*\| {need:.1f} GiB", readme), name
