"""configs/gpu80/: for each paper config, the variant for one 80 GB GPU trains the same thing (same model,
adapter, data and evaluation; about the same examples per optimizer step, in packed rows) with the memory it is
computed to need stated in its comment and in the README, and that memory fits an 80 GB GPU. The GPU-scale repro
configs (configs/repro/gpu_*.yaml) pack too, at the examples per step they state."""

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
REPRO_GPU_CONFIGS = sorted(p.name for p in (ROOT / "configs" / "repro").glob("gpu_*.yaml"))
USABLE_GIB = 80e9 / 2**30 * 0.9  # an 80 GB card, less the CUDA context and the allocator's fragmentation
# Offline stand-ins for the training sets the paper configs name (the real ones need the hub).
STAND_INS = {"metamathqa": "gsm8k_bundled_train", "commonsense170k": "commonsense_bundled_train"}
# How far a packed step's examples may be from the unpacked setting's: rows are whole, so the row count is
# rounded, and the stand-in data and tokenizer are not the real ones.
EXAMPLES_TOLERANCE = 0.06
SAMPLE = 2000  # examples tokenized per estimate: the mean examples per row moves < 1% from 2,000 to 20,000


def _stated_gib(path: Path) -> float:
    found = re.findall(r"Computed to need ([\d.]+) GiB", path.read_text())
    assert len(found) == 1, path
    return float(found[0])


def _stated_examples(path: Path) -> int:
    found = re.findall(r"Effective batch: about (\d+) examples per optimizer step", path.read_text())
    assert len(found) == 1, path
    return int(found[0])


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_gpu_variant_trains_what_the_paper_config_trains(name):
    paper = load_config(ROOT / "configs" / f"{name}.yaml").model_dump()
    gpu = load_config(ROOT / "configs" / "gpu80" / f"{name}.yaml").model_dump()
    for section in ("model", "adapter", "eval", "distributed"):
        assert gpu[section] == paper[section], section
    assert gpu["data"]["packing"] is True and gpu["data"]["group_by_length"] is False
    assert {**gpu["data"], "packing": False} == paper["data"]
    changed = {"micro_batch_size", "grad_accum_steps", "gradient_checkpointing", "loss_impl"}
    assert {k: v for k, v in gpu["train"].items() if k not in changed} == {
        k: v for k, v in paper["train"].items() if k not in changed
    }
    p, g = paper["train"], gpu["train"]
    assert _stated_examples(ROOT / "configs" / "gpu80" / f"{name}.yaml") == (
        p["micro_batch_size"] * p["grad_accum_steps"]
    )
    assert g["micro_batch_size"] >= 4 and not g["gradient_checkpointing"]
    assert g["loss_impl"] == "chunked"  # Gemma-2's soft-cap included
    assert gpu["output_dir"] != paper["output_dir"]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_gpu_variant_states_the_memory_it_is_computed_to_need(name):
    path = ROOT / "configs" / "gpu80" / f"{name}.yaml"
    cfg = load_config(path)
    arch = next(v for k, v in bench.PAPER.items() if f"configs/{name}.yaml" in k)
    chunked = cfg.train.loss_impl == "chunked"
    e = bench.estimate(arch[:8] + (cfg.train.micro_batch_size, cfg.data.max_seq_len, False), chunked)
    need = e["bf16_weights"] + e["adapter_adamw"] + e["activations"] + e["logits"]
    assert _stated_gib(path) == round(need, 1)
    assert need < USABLE_GIB
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"configs/gpu80/{re.escape(name)}\.yaml.*\| {need:.1f} GiB", readme), name


@pytest.mark.parametrize("name", REPRO_GPU_CONFIGS)
def test_repro_gpu_config_packs_with_the_chunked_loss(name):
    cfg = load_config(ROOT / "configs" / "repro" / name)
    assert cfg.data.packing and not cfg.data.group_by_length and cfg.train.loss_impl == "chunked"
    assert _stated_examples(ROOT / "configs" / "repro" / name) == 16  # the set's unpacked 16 x 1


def _examples_per_row(data, tokenizer, seed: int) -> float:
    """Mean examples per packed row from abba's own planner (data/packing.py) on a seeded sample of the data.
    Examples longer than a row are cut to one (data.drop_long false), so each fills a row."""
    from abba_cli.data.packing import pack_rows
    from abba_cli.data.training_set import prepare_train_dataset

    row = data.max_seq_len
    n = SAMPLE if data.num_samples is None else min(SAMPLE, data.num_samples)
    whole = data.model_copy(
        update={
            "recipe": STAND_INS.get(data.recipe, data.recipe),
            "num_samples": n,
            "max_seq_len": 4096,
            "cache": False,
        }
    )
    dataset, _ = prepare_train_dataset(whole, tokenizer, "SmolLM2")
    lengths = [min(length, row) for length in dataset["length"]]
    return len(lengths) / len(pack_rows(lengths, row, seed))


@pytest.mark.slow  # the bundled SmolLM2's tokenizer (converted once per test run)
def test_packed_steps_hold_about_the_unpacked_examples(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    paths = [ROOT / "configs" / "gpu80" / f"{n}.yaml" for n in PAPER_CONFIGS]
    paths += [ROOT / "configs" / "repro" / n for n in REPRO_GPU_CONFIGS]
    per_row: dict[tuple, float] = {}
    for path in paths:
        cfg = load_config(path)
        key = (cfg.data.recipe, cfg.data.num_samples, cfg.data.skip_samples, cfg.data.max_seq_len)
        if key not in per_row:
            per_row[key] = _examples_per_row(cfg.data, tokenizer, cfg.train.seed)
        rows = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
        examples = rows * per_row[key]
        stated = _stated_examples(path)
        assert abs(examples / stated - 1) < EXAMPLES_TOLERANCE, (path.name, rows, per_row[key], examples)
