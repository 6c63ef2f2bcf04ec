"""`abba export --format peft-lora`: PEFT loads the export and reproduces the ABBA/LoRA adapter exactly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import cli, make_run, ours_vs_peft
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from abba_cli.adapters import adapter_layers, inject_adapters, save_adapter
from abba_cli.adapters.abba import khatri_rao_factors
from abba_cli.config import AdapterConfig
from abba_cli.errors import UserError
from abba_cli.ship.export import export_run, peft_alpha


def test_khatri_rao_identity_float64():
    g = torch.Generator().manual_seed(0)
    B1, A1 = (
        torch.randn(7, 3, generator=g, dtype=torch.float64),
        torch.randn(3, 5, generator=g, dtype=torch.float64),
    )
    B2, A2 = (
        torch.randn(7, 2, generator=g, dtype=torch.float64),
        torch.randn(2, 5, generator=g, dtype=torch.float64),
    )
    B, A = khatri_rao_factors(B1, A1, B2, A2)
    assert B.shape == (7, 6) and A.shape == (6, 5)
    torch.testing.assert_close(B @ A, (B1 @ A1) * (B2 @ A2), rtol=1e-12, atol=1e-12)


def test_peft_alpha_hand_computed_cases():
    assert peft_alpha(4.0, 16) == (64.0, 1.0)  # 64 / 16 is exactly 4
    assert peft_alpha(0.5, 8) == (4.0, 1.0)
    assert peft_alpha(0.1, 3) == (3.0, 0.1)  # 0.1 * 3 / 3 != 0.1 in binary: PEFT scale 1, s folded into B


@pytest.mark.parametrize("r1, r2", [(2, 2), (3, 5)])
def test_abba_export_loads_in_peft_and_matches(tiny_model_dir, tmp_path, r1, r2):
    run = make_run(
        tmp_path / "run",
        tiny_model_dir,
        type="abba",
        r1=r1,
        r2=r2,
        target_modules=["q_proj", "v_proj", "down_proj"],
    )
    out = tmp_path / "peft"
    export_run(format="peft-lora", out=out, run=run)

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == r1 * r2
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir)
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    _export_scale_check(run, out)
    tensors = load_file(out / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (r1 * r2, 64) and b.shape == (64, r1 * r2) and a.dtype == torch.float32
    assert len(tensors) == 2 * 3 * 2

    diff, effect = ours_vs_peft(tiny_model_dir, run, out)
    assert effect > 1e-2
    assert diff < 1e-5


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}, {"init": "pissa"}])
def test_lora_export_matches(tiny_model_dir, tmp_path, extra):
    run = tmp_path / "run"
    if extra.get("init") == "pissa":
        # PiSSA needs its SVD init (B0, A0 and the residual base); then perturb B, A so dW != 0.
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        cfg = AdapterConfig(type="lora", r=4, **extra)
        inject_adapters(model, cfg)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, layer in adapter_layers(model):
                layer.A.add_(torch.randn(layer.A.shape, generator=gen) * 0.3)
                layer.B.add_(torch.randn(layer.B.shape, generator=gen) * 0.3)
        save_adapter(model, cfg, run, base_model=str(tiny_model_dir))
        rank = 8
    else:
        make_run(run, tiny_model_dir, type="lora", r=4, **extra)
        rank = 4
    out = tmp_path / "peft"
    export_run(format="peft-lora", out=out, run=run)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == rank
    diff, effect = ours_vs_peft(tiny_model_dir, run, out)
    assert effect > 1e-2
    assert diff < 1e-5


def test_hira_export_is_refused_with_the_reason(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, type="hira", r=4)
    result = cli(*["export", "--format", "peft-lora", "--out", str(tmp_path / "o"), "--run", str(run)])
    assert result.exit_code == 2
    assert "HiRA" in result.output and "W0" in result.output
    assert not (tmp_path / "o").exists()


def test_unknown_format_lists_valid_formats(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=2, r2=2)
    result = cli(*["export", "--format", "onnx", "--out", str(tmp_path / "o"), "--run", str(run)])
    assert result.exit_code == 2
    assert "onnx" in result.output and "peft-lora" in result.output and "gguf" in result.output


def test_non_empty_output_is_kept_without_overwrite(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=2, r2=2)
    out = tmp_path / "o"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    digest = hashlib.sha256((out / "adapter_config.json").read_bytes()).hexdigest()
    result = cli(*["export", "--out", str(out), "--run", str(run)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert hashlib.sha256((out / "adapter_config.json").read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json"]

    result = cli(*["export", "--out", str(out), "--run", str(run), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "rank 4" in result.output and "KiB" in result.output
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_adapter_from_another_base_is_refused(tiny_model_dir, tiny_model_dir_other, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=2, r2=2)
    cfg = json.loads((run / "adapter_config.json").read_text())
    cfg["base_model"] = str(tiny_model_dir_other)
    (run / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"does not fit base model"):
        export_run(format="peft-lora", out=tmp_path / "o", run=run)
    assert not (tmp_path / "o").exists()


def test_corrupt_factor_names_are_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=2, r2=2)
    tensors = load_file(run / "adapter_model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.C1"] = torch.zeros(2, 2)
    save_file(tensors, run / "adapter_model.safetensors")
    with pytest.raises(UserError, match="unexpected tensor"):
        export_run(format="peft-lora", out=tmp_path / "o", run=run)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_is_refused(tiny_model_dir, tmp_path, bad):
    from safetensors.torch import save_file

    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=2, r2=2)
    tensors = load_file(run / "adapter_model.safetensors")
    tensors = {k: torch.full_like(v, bad) if k.endswith(".B2") else v for k, v in tensors.items()}
    save_file(tensors, run / "adapter_model.safetensors")
    result = cli(*["export", "--out", str(tmp_path / "o"), "--run", str(run)])
    assert result.exit_code == 2, result.output
    assert "NaN or infinite" in result.output and ".B2" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def _export_scale_check(run: Path, out: Path) -> None:
    """PEFT's effective update lora_alpha/r · B A equals s (B1@A1)*(B2@A2), both computed here in float64."""
    meta = json.loads((run / "adapter_config.json").read_text())
    cfg = json.loads((out / "adapter_config.json").read_text())
    ours = load_file(run / "adapter_model.safetensors")
    theirs = load_file(out / "adapter_model.safetensors")
    module = "model.layers.0.self_attn.q_proj"
    f = {k: ours[f"{module}.{k}"].double() for k in ("B1", "A1", "B2", "A2")}
    ref = meta["scaling"] * (f["B1"] @ f["A1"]) * (f["B2"] @ f["A2"])
    b = theirs[f"{PEFT_KEY.format(module)}.lora_B.weight"].double()
    a = theirs[f"{PEFT_KEY.format(module)}.lora_A.weight"].double()
    got = cfg["lora_alpha"] / cfg["r"] * (b @ a)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6


PEFT_KEY = "base_model.model.{}"


@pytest.mark.parametrize(
    ("r1", "r2", "alpha", "hint"),
    [(2, 3, 0.7, "--max-lora-rank 8"), (9, 9, 0.1, "--max-lora-rank 128")],
    ids=["r1-ne-r2", "rank-81"],
)
def test_export_with_a_folded_scale_loads_in_peft(tiny_model_dir, tmp_path, capsys, r1, r2, alpha, hint):
    """Released scaling s = alpha is not representable as lora_alpha/r here, so it is folded into B (fold != 1);
    rank 81 is above 64 (vLLM then needs --max-lora-rank 128)."""
    run = make_run(
        tmp_path / "run", tiny_model_dir, type="abba", r1=r1, r2=r2, alpha=alpha, scaling="released"
    )
    s = json.loads((run / "adapter_config.json").read_text())["scaling"]
    assert s == alpha and (s * r1 * r2) / (r1 * r2) != s  # the case that needs the fold
    out = tmp_path / "peft"
    export_run(format="peft-lora", out=out, run=run)
    assert hint in capsys.readouterr().out
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == r1 * r2 and cfg["lora_alpha"] == r1 * r2  # PEFT scale 1, s lives in B
    _export_scale_check(run, out)
    diff, effect = ours_vs_peft(tiny_model_dir, run, out)
    assert effect > 1e-2 and diff < 1e-5


def test_vllm_rank_hint_uses_the_served_ranks():
    from abba_cli.ship.export import vllm_hint, vllm_max_lora_rank

    assert [vllm_max_lora_rank(r) for r in (4, 9, 81, 256, 300, 512, 1024)] == [
        8,
        16,
        128,
        256,
        320,
        512,
        None,
    ]
    assert "merge" in vllm_hint(1024) and "warning" in vllm_hint(1024)


def test_export_through_a_symlink_writes_into_its_target(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=2, r2=2)
    target = tmp_path / "served"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    result = cli(*["export", "--out", str(link), "--run", str(run)])
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "adapter_config.json").is_file() and (link / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "run", "served"]


def test_export_inside_the_run_is_refused(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=2, r2=2)
    result = cli(*["export", "--out", str(run / "peft"), "--run", str(run)])
    assert result.exit_code == 2 and "inside the run directory" in result.output
    assert not (run / "peft").exists()


def _checkpoint(run: Path, step: int, factor: float) -> Path:
    """A planted RUN_DIR/checkpoints/step-N holding the run's factors times `factor`."""
    from safetensors.torch import save_file

    ckpt = run / "checkpoints" / f"step-{step}"
    ckpt.mkdir(parents=True)
    tensors = load_file(run / "adapter_model.safetensors")
    save_file({k: v * factor for k, v in tensors.items()}, ckpt / "adapter_model.safetensors")
    (ckpt / "state.json").write_text(json.dumps({"step": step}))
    return ckpt


def test_export_a_checkpoint(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, type="lora", r=4)
    ckpt = _checkpoint(run, 3, 0.5)
    export_run(format="peft-lora", out=tmp_path / "final", run=run)
    export_run(format="peft-lora", out=tmp_path / "step3", run=ckpt)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    final, step3 = (load_file(tmp_path / d / "adapter_model.safetensors")[key] for d in ("final", "step3"))
    torch.testing.assert_close(step3, final * 0.5, rtol=0, atol=0)
    # An unfinished run has no adapter_config.json yet: its config.yaml says which adapter the checkpoint holds.
    from abba_cli.config import RunConfig, dump_config

    cfg = RunConfig(
        model={"name_or_path": str(tiny_model_dir)},
        adapter={"type": "lora", "r": 4},
        data={"recipe": "gsm8k_bundled_train"},
        output_dir=str(run),
    )
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "adapter_config.json").unlink()
    (run / "adapter_model.safetensors").unlink()
    export_run(format="peft-lora", out=tmp_path / "unfinished", run=ckpt)
    got = load_file(tmp_path / "unfinished" / "adapter_model.safetensors")[key]
    torch.testing.assert_close(got, step3, rtol=0, atol=0)
    diff, effect = ours_vs_peft(tiny_model_dir, ckpt, tmp_path / "unfinished")
    assert effect > 1e-2 and diff < 1e-5
