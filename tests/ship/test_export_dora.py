"""DoRA <-> PEFT: `abba export --format peft-lora` writes what PEFT itself saves for use_dora (key names checked
against a PEFT-saved DoRA model) and PEFT reproduces our logits; PEFT DoRA folders are read by eval/merge/export."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli, logits, make_run, max_rel, ours_vs_peft
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from abba_cli.adapters import load_adapter
from abba_cli.run.adapter_files import read_run_adapter
from abba_cli.ship.export import export_run
from abba_cli.ship.merge import merge_run

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_dora(base_dir, out, **extra):
    """A DoRA adapter saved by PEFT itself, every factor random (m included) so that each one matters."""
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, **extra)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "magnitude" in name else 0.0))
    model.save_pretrained(out)
    data = json.loads((out / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True, "alpha": 3.0}])
def test_export_is_what_peft_saves_and_peft_reproduces_our_logits(tiny_model_dir, tmp_path, extra):
    run = make_run(tmp_path / "run", tiny_model_dir, type="dora", r=4, target_modules=TARGETS, **extra)
    out = export_run(format="peft-lora", out=tmp_path / "peft", run=run)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["r"] == 4
    theirs = _peft_dora(tiny_model_dir, tmp_path / "peft-own")
    assert sorted(load_file(out / "adapter_model.safetensors")) == sorted(
        load_file(theirs / "adapter_model.safetensors")
    )
    diff, effect = ours_vs_peft(tiny_model_dir, run, out)
    assert effect > 1e-2 and diff < 1e-5


def test_peft_dora_folder_runs_on_eval_merge_and_export(tiny_model_dir, tmp_path):
    peft_dir = _peft_dora(tiny_model_dir, tmp_path / "peft")
    assert read_run_adapter(peft_dir).type == "dora"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft_dir)
    theirs = logits(peft_model.eval(), tiny_model_dir)
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert load_adapter(ours, peft_dir).type == "dora"  # what `abba eval --run PEFT_DIR` loads
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tiny_model_dir)
    assert max_rel(theirs, base) > 1e-2
    assert max_rel(theirs, logits(ours, tiny_model_dir)) < 1e-5

    meta = merge_run(out=tmp_path / "merged", run=peft_dir, dtype="fp32")
    assert meta["check"]["passed"] and meta["layers_merged"] == 2 * len(TARGETS)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert max_rel(theirs, logits(merged, tiny_model_dir)) < 1e-5

    again = export_run(format="peft-lora", out=tmp_path / "again", run=peft_dir)
    a, b = load_file(peft_dir / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_rank_truncation_and_a_missing_magnitude_are_one_line_errors(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, type="dora", r=4, target_modules=["q_proj"])
    result = cli(
        "export", "--format", "peft-lora", "--rank", "2", "--run", str(run), "--out", str(tmp_path / "o")
    )
    assert result.exit_code == 2 and "cannot truncate a DoRA adapter" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()

    peft_dir = _peft_dora(tiny_model_dir, tmp_path / "peft")
    tensors = load_file(peft_dir / "adapter_model.safetensors")
    from safetensors.torch import save_file

    save_file(
        {k: v for k, v in tensors.items() if "magnitude" not in k}, peft_dir / "adapter_model.safetensors"
    )
    result = cli("merge", "--out", str(tmp_path / "m"), "--run", str(peft_dir))
    assert result.exit_code == 2 and "lacks m" in result.output, result.output
