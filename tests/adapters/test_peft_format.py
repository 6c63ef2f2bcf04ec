"""PEFT LoHa export (exact, r1 != r2 by zero padding) and reading PEFT LoRA/LoHa folders (eval, merge, export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import cli, logits, make_run, max_rel, ours_vs_peft
from peft import LoHaConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from abba_cli.adapters import adapter_layers, load_adapter
from abba_cli.errors import UserError
from abba_cli.run.adapter_files import read_run_adapter
from abba_cli.ship.export import export_run
from abba_cli.ship.merge import merge_run

TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_trained(base_dir: Path, out: Path, config) -> Path:
    """An adapter 'trained elsewhere': PEFT's own layers with random (nonzero) factors, saved by PEFT."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "hada_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)  # as from_pretrained(base_dir) would have recorded it
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def delta_weights(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Every layer's dW as our own layers compute it (fp32), after load_adapter."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    load_adapter(model, adapter_dir)
    with torch.no_grad():
        return {name: layer.delta_weight().double() for name, layer in adapter_layers(model)}


def test_loha_export_writes_what_peft_itself_saves(tiny_model_dir, tmp_path):
    """Key names, shapes and config fields of our LoHa export are the ones PEFT's save_pretrained writes."""
    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=3, r2=3, target_modules=TARGETS)
    export_run(format="peft-loha", out=tmp_path / "ours", run=run)
    peft_dir = peft_trained(
        tiny_model_dir, tmp_path / "peft", LoHaConfig(r=3, alpha=3, target_modules=TARGETS)
    )
    ours, theirs = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "ours", peft_dir))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert len(ours) == 4 * 3 * 2
    ours_cfg, peft_cfg = (
        json.loads((d / "adapter_config.json").read_text()) for d in (tmp_path / "ours", peft_dir)
    )
    assert set(ours_cfg) <= set(peft_cfg) and ours_cfg["peft_type"] == peft_cfg["peft_type"] == "LOHA"


@pytest.mark.parametrize(
    ("r1", "r2", "extra"),
    [(3, 3, {}), (2, 5, {}), (5, 2, {}), (2, 3, {"alpha": 0.7, "scaling": "released"})],
    ids=["r1-eq-r2", "r1-lt-r2", "r1-gt-r2", "folded-scale"],
)
def test_loha_export_loads_in_peft_and_matches(tiny_model_dir, tmp_path, capsys, r1, r2, extra):
    run = make_run(
        tmp_path / "run", tiny_model_dir, type="abba", r1=r1, r2=r2, target_modules=TARGETS, **extra
    )
    out = tmp_path / "loha"
    export_run(format="peft-loha", out=out, run=run)
    assert "PEFT LoHa" in capsys.readouterr().out
    cfg = json.loads((out / "adapter_config.json").read_text())
    r = max(r1, r2)
    assert cfg["r"] == r and cfg["peft_type"] == "LOHA"
    s = json.loads((run / "adapter_config.json").read_text())["scaling"]
    # PEFT's LoHa scale is alpha / r (peft/tuners/loha/layer.py): s exactly, or 1 with s folded into w1_a.
    assert cfg["alpha"] / r == s or cfg["alpha"] == r
    tensors = load_file(out / "adapter_model.safetensors")
    w2a = tensors["base_model.model.model.layers.0.self_attn.q_proj.hada_w2_a"]
    assert w2a.shape == (64, r) and bool((w2a[:, r2:] == 0).all()) and bool((w2a[:, :r2] != 0).any())

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert peft_model.peft_config["default"].peft_type == "LOHA"
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__module__.startswith(
        "peft.tuners.loha"
    )
    diff, effect = ours_vs_peft(tiny_model_dir, run, out)
    assert effect > 1e-2 and diff < 1e-5


def test_loha_export_of_lora_and_rank_are_refused(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, type="lora", r=4)
    for extra in ([], ["--rank", "2"]):
        args = ["export", "--format", "peft-loha", "--out", str(tmp_path / "o"), "--run", str(run), *extra]
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert "peft-lora" in result.output
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt", ["peft-lora", "peft-loha"])
def test_export_import_round_trip_keeps_dw(tiny_model_dir, tmp_path, fmt):
    """Our export read back as an adapter folder gives the same dW as the run (float64 comparison)."""
    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=2, r2=3, target_modules=TARGETS)
    out = export_run(format=fmt, out=tmp_path / "exported", run=run)
    want, got = delta_weights(tiny_model_dir, run), delta_weights(tiny_model_dir, out)
    assert sorted(want) == sorted(got) and len(want) == 6
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], rtol=1e-5, atol=1e-6 * float(want[name].abs().max())
        )
    # And the factors themselves come back bit for bit (the import renames, it does not recompute).
    imported = read_run_adapter(out)
    assert imported.type == ("lora" if fmt == "peft-lora" else "abba")
    exported = load_file(out / "adapter_model.safetensors")
    module = "model.layers.1.mlp.down_proj"
    if fmt == "peft-loha":
        assert torch.equal(imported.factors[module]["A1"], exported[f"base_model.model.{module}.hada_w1_b"])
    else:
        assert torch.equal(
            imported.factors[module]["B"], exported[f"base_model.model.{module}.lora_B.weight"]
        )


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
        LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"], layers_to_transform=[1]),
        LoHaConfig(r=3, alpha=5, target_modules=TARGETS),
    ],
    ids=["lora", "rslora-one-layer", "loha"],
)
def test_peft_folder_runs_on_our_harness(tiny_model_dir, tmp_path, config):
    """A PEFT-trained folder: our load_adapter (what `abba eval` uses) and `abba merge` reproduce PEFT's logits."""
    peft_dir = peft_trained(tiny_model_dir, tmp_path / "peft", config)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft_dir
    ).eval()
    theirs = logits(peft_model, tiny_model_dir)
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    load_adapter(ours, peft_dir)
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tiny_model_dir)
    assert max_rel(theirs, base) > 1e-2  # the adapter does something
    assert max_rel(theirs, logits(ours, tiny_model_dir)) < 1e-5

    meta = merge_run(out=tmp_path / "merged", run=peft_dir, dtype="fp32")
    assert meta["check"]["passed"] and meta["layers_merged"] == len(list(adapter_layers(ours)))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert max_rel(theirs, logits(merged, tiny_model_dir)) < 1e-5


def test_eval_cli_takes_a_peft_folder(tiny_model_dir, tmp_path):
    peft_dir = peft_trained(
        tiny_model_dir, tmp_path / "peft", LoHaConfig(r=2, alpha=2, target_modules=TARGETS)
    )
    args = ["eval", "--task", "gsm8k", "--limit", "1", "--max-new-tokens", "2", "--run", str(peft_dir)]
    result = cli(*[*args, "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "gsm8k" / "metrics.json").read_text())
    assert metrics["n"] == 1
    # The run's default output folder is the adapter folder's eval/, as for a run directory.
    assert not (peft_dir / "eval").exists()


def _edit(peft_dir: Path, **changes) -> None:
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg.update(changes)
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
        ({"use_dora": True}, "lacks m"),  # DoRA without its magnitude vectors
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern is set"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights 'pissa'"),
        ({"r": 5}, "do not fit rank r=5"),
    ],
)
def test_unreadable_peft_settings_are_one_line(tiny_model_dir, tmp_path, changes, message):
    peft_dir = peft_trained(tiny_model_dir, tmp_path / "peft", LoraConfig(r=4, target_modules=["q_proj"]))
    _edit(peft_dir, **changes)
    result = cli(*["merge", "--out", str(tmp_path / "m"), "--run", str(peft_dir)])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_peft_folder_for_another_base_is_refused(tiny_model_dir, tiny_model_dir_other, tmp_path):
    peft_dir = peft_trained(
        tiny_model_dir, tmp_path / "peft", LoHaConfig(r=2, alpha=2, target_modules=TARGETS)
    )
    with pytest.raises(UserError, match="does not fit base model"):
        merge_run(out=tmp_path / "m", run=peft_dir, base=tiny_model_dir_other)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir_other)
    with pytest.raises(UserError, match=r"hada_w1_a|B1|shape"):
        load_adapter(model, peft_dir)
    # A module the base does not have at all.
    tensors = load_file(peft_dir / "adapter_model.safetensors")
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(tensors, peft_dir / "adapter_model.safetensors")
    with pytest.raises(UserError, match=r"layers\.7\..* which base model"):
        merge_run(out=tmp_path / "m", run=peft_dir)
