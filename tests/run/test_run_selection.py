"""abba_cli.run (latest, adapter_files): --run a checkpoint, a moved base, for eval (merge and export have theirs in their files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import make_run
from safetensors.torch import load_file, save_file

from abba_cli.adapters import adapter_layers
from abba_cli.config import RunConfig, dump_config
from abba_cli.errors import UserError
from abba_cli.run.latest import resolve_run
from abba_cli.run.layout import run_files


def _planted_checkpoint(run: Path, step: int, factor: float) -> Path:
    ckpt = run / "checkpoints" / f"step-{step}"
    ckpt.mkdir(parents=True)
    tensors = load_file(run / "adapter_model.safetensors")
    save_file({k: v * factor for k, v in tensors.items()}, ckpt / "adapter_model.safetensors")
    (ckpt / "state.json").write_text(json.dumps({"step": step}))
    return ckpt


def test_a_checkpoint_resolves_to_its_own_factors_and_its_runs_settings(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=2, r2=2)
    ckpt = _planted_checkpoint(run, 4, 0.5)
    assert resolve_run(ckpt) == ckpt
    files = run_files(ckpt)
    assert files.root == run and files.weights == ckpt / "adapter_model.safetensors"
    assert run_files(run).weights == run / "adapter_model.safetensors"
    (tmp_path / "stray").mkdir()
    with pytest.raises(UserError, match="no such run directory|missing"):
        resolve_run(tmp_path / "stray" / "step-4")


def test_eval_of_a_checkpoint_merges_the_checkpoints_factors(tiny_model_dir, tmp_path):
    from abba_cli.eval.target import load_model_for_eval, resolve_target

    run = make_run(tmp_path / "run", tiny_model_dir, type="lora", r=4)
    cfg = RunConfig(
        model={"name_or_path": str(tiny_model_dir)},
        adapter={"type": "lora", "r": 4},
        data={"recipe": "gsm8k_bundled_train"},
        eval={"skip": 7},
        output_dir=str(run),
    )
    (run / "config.yaml").write_text(dump_config(cfg))
    ckpt = _planted_checkpoint(run, 2, 2.0)
    target = resolve_target(ckpt, None, None)
    assert target.model == str(tiny_model_dir) and target.run_dir == ckpt
    assert target.eval_defaults.skip == 7  # the run's config.yaml, found from its checkpoint
    model, _, _ = load_model_for_eval(target.model, target.run_dir, target.load_kwargs)
    assert not list(adapter_layers(model))
    w0 = load_file(tiny_model_dir / "model.safetensors")
    factors = load_file(ckpt / "adapter_model.safetensors")
    s = json.loads((run / "adapter_config.json").read_text())["scaling"]
    name = "model.layers.1.mlp.up_proj"
    ref = w0[f"{name}.weight"].double() + s * factors[f"{name}.B"].double() @ factors[f"{name}.A"].double()
    got = model.get_submodule(name).weight.double()
    assert float((got - ref).abs().max()) < 1e-5


def test_a_moved_base_is_named_with_its_source_and_base_points_elsewhere(tiny_model_dir, tmp_path):
    from abba_cli.eval.target import resolve_target

    copy = tmp_path / "base"
    shutil.copytree(tiny_model_dir, copy)
    run = make_run(tmp_path / "run", copy, type="abba", r1=2, r2=2)
    copy.rename(tmp_path / "moved")
    with pytest.raises(
        UserError, match=r"base model .*base \(recorded in .*run/adapter_config.json\).*--base"
    ):
        resolve_target(run, None, None)
    target = resolve_target(run, None, None, tmp_path / "moved")
    assert target.model == str((tmp_path / "moved").resolve()) and target.out_dir == run / "eval"
    with pytest.raises(UserError, match="--base .*nowhere: no such model directory"):
        resolve_target(run, None, None, tmp_path / "nowhere")
