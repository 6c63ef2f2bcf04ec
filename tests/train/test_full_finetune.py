"""adapter.type full: every base weight trains; RUN_DIR/model is a plain HF folder that eval reads and
merge/export refuse (the model is already merged)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import UNSET, bundled_gsm8k_data, cli, replace_training_loss, tiny_config
from safetensors.torch import load_file

from abba_cli.config import validate_config
from abba_cli.errors import UserError
from abba_cli.run.latest import resolve_run
from abba_cli.train.loss import target_loss_sum


def _config(tmp_path: Path, model_dir: Path, out: str = "full", **train) -> Path:
    return tiny_config(
        tmp_path,
        model_dir,
        out,
        adapter={"type": "full", "r1": UNSET, "r2": UNSET, "target_modules": UNSET},
        data=bundled_gsm8k_data(8),
        train={"lr": 1e-3, **train},
    )


def _invoke(*args: str):
    return cli(*args)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir) -> Path:
    tmp = tmp_path_factory.mktemp("full-run")
    result = _invoke("train", str(_config(tmp, tiny_model_dir)))
    assert result.exit_code == 0, result.output
    return tmp / "full"


@pytest.mark.parametrize("key", [{"r": 8}, {"r1": 4}, {"r2": 4}, {"alpha": 2.0}, {"dropout": 0.1}])
def test_full_takes_no_adapter_keys(key):
    raw = {"model": {"name_or_path": "x"}, "adapter": {"type": "full", **key}, "data": {"recipe": "gsm8k"}}
    with pytest.raises(UserError, match="full"):
        validate_config(raw, "c.yaml")


def test_full_config_resolves_without_ranks():
    cfg = validate_config(
        {
            "model": {"name_or_path": "x"},
            "adapter": {"type": "full"},
            "data": {"recipe": "gsm8k"},
            "output_dir": "o",
        }
    )
    assert (cfg.adapter.r, cfg.adapter.r1, cfg.adapter.r2, cfg.adapter.alpha) == (None, None, None, None)


def test_full_run_writes_a_plain_hf_model_that_trained_every_weight(full_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert not (full_run / "adapter_model.safetensors").exists()
    assert not (full_run / "adapter_config.json").exists()
    for name in ("config.yaml", "metrics.jsonl", "model/config.json"):
        assert (full_run / name).is_file(), name
    trained = AutoModelForCausalLM.from_pretrained(full_run / "model")
    AutoTokenizer.from_pretrained(full_run / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert trained.config.use_cache is not False  # training turns the cache off; the saved model has it back
    base_params = dict(base.named_parameters())
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, base_params[n])]
    # Every matrix, norm and embedding moved (not just the seven projections an adapter would touch).
    assert len(changed) == len(base_params), sorted(set(base_params) - set(changed))
    assert resolve_run(full_run, allow_full=True) == full_run
    with pytest.raises(UserError, match="already a plain Hugging Face folder"):
        resolve_run(full_run)  # what merge and export call


def test_eval_run_reads_the_trained_model(full_run):
    result = _invoke(
        "eval", "--task", "gsm8k", "--limit", "2", "--max-new-tokens", "4", "--run", str(full_run)
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((full_run / "eval" / "gsm8k" / "metrics.json").read_text())
    assert metrics["n"] == 2 and metrics["model"] == str(full_run / "model")
    assert metrics["adapter_run"] is None


def test_eval_refuses_run_plus_model(full_run, tiny_model_dir):
    result = _invoke("eval", "--task", "gsm8k", "--run", str(full_run), "--model", str(tiny_model_dir))
    assert result.exit_code == 2 and "full fine-tuning run" in result.stderr


@pytest.mark.parametrize("command", [["merge"], ["export", "--format", "peft-lora"]])
def test_merge_and_export_refuse_a_full_run(full_run, tmp_path, command):
    out = tmp_path / "out"
    result = _invoke(*command, "--run", str(full_run), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "full fine-tuning run" in result.stderr and str(full_run / "model") in result.stderr
    assert not out.exists()


def test_full_checkpoint_holds_every_parameter_and_resumes_exactly(tmp_path, tiny_model_dir, monkeypatch):
    settings = dict(max_steps=3, save_every=1, save_total_limit=3)
    assert _invoke("train", str(_config(tmp_path, tiny_model_dir, "whole", **settings))).exit_code == 0
    ckpt = load_file(tmp_path / "whole" / "checkpoints" / "step-1" / "adapter_model.safetensors")
    from transformers import AutoModelForCausalLM

    names = {n for n, _ in AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters()}
    assert set(ckpt) == names

    split = _config(tmp_path, tiny_model_dir, "split", **settings)
    real, calls = target_loss_sum, {"n": 0}

    def dies_in_step_3(logits, labels):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(logits, labels)

    replace_training_loss(monkeypatch, dies_in_step_3)
    assert _invoke("train", str(split)).exit_code == 130
    monkeypatch.undo()
    result = _invoke("train", str(split), "--resume")
    assert result.exit_code == 0, result.output
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_full_run_with_tied_embeddings(tmp_path):
    """SmolLM2 ties lm_head to the embeddings: the shared weight trains once, saves once and reloads tied."""
    from conftest import build_tiny_llama, build_tiny_tokenizer
    from transformers import AutoModelForCausalLM

    base = tmp_path / "tied"
    tok = build_tiny_tokenizer()
    build_tiny_llama(len(tok), tie_word_embeddings=True).save_pretrained(base)
    tok.save_pretrained(base)
    result = _invoke("train", str(_config(tmp_path, base, save_every=1)))
    assert result.exit_code == 0, result.output
    ckpt = load_file(tmp_path / "full" / "checkpoints" / "step-2" / "adapter_model.safetensors")
    assert "lm_head.weight" not in ckpt and "model.embed_tokens.weight" in ckpt
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")
    assert trained.lm_head.weight.data_ptr() == trained.model.embed_tokens.weight.data_ptr()
    assert torch.equal(trained.model.embed_tokens.weight, ckpt["model.embed_tokens.weight"])
