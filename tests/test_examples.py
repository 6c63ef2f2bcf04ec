"""The library-API examples under examples/: a few steps on the tiny model, then our commands take the result."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from abba_cli.ship.export import export_run
from abba_cli.ship.merge import merge_run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def check_run_folder(run: Path, base_dir: Path, tmp_path: Path) -> None:
    """What `abba merge` and `abba export` need is there, and the adapter trained (B2 moved from 0)."""
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["type"] == "abba" and cfg["base_model"] == str(base_dir.resolve())
    tensors = load_file(run / "adapter_model.safetensors")
    b2 = [t for k, t in tensors.items() if k.endswith(".B2")]
    assert len(b2) == 2 * 4 and all(float(t.abs().max()) > 0 for t in b2)
    meta = merge_run(out=tmp_path / "merged", run=run, dtype="fp32")
    assert meta["check"]["passed"] and meta["layers_merged"] == 8
    export_run(format="peft-loha", out=tmp_path / "loha", run=run)
    assert json.loads((tmp_path / "loha" / "adapter_config.json").read_text())["r"] == 2


def test_hf_trainer_example_runs_and_merges(tiny_model_dir, tmp_path, monkeypatch):
    example = load_example("train_with_hf_trainer")
    monkeypatch.chdir(tmp_path)  # a relative --out, as a user would type it
    run = example.main(
        ["--model", str(tiny_model_dir), "--out", "run", "--r1", "2", "--r2", "2", "--max-steps", "3"]
    )
    assert sorted(p.name for p in (tmp_path / run).iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    check_run_folder(tmp_path / run, tiny_model_dir, tmp_path)


def test_trl_example_runs_and_merges(tiny_model_dir, tmp_path):
    pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'abba-cli[trl]'")
    example = load_example("train_with_trl")
    run = example.main(
        [
            "--model",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "run"),
            "--r1",
            "2",
            "--r2",
            "2",
            "--max-steps",
            "3",
        ]
    )
    check_run_folder(run, tiny_model_dir, tmp_path)


def test_save_adapter_records_a_local_base_absolutely(tiny_model_dir, tmp_path, monkeypatch):
    """A library user passes the path they loaded from; eval/merge must find it from any working directory."""
    from transformers import AutoModelForCausalLM

    from abba_cli.adapters import inject_adapters, save_adapter
    from abba_cli.config import AdapterConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = AdapterConfig(type="abba", r1=2, r2=2, target_modules=["q_proj"])
    inject_adapters(model, cfg)
    monkeypatch.chdir(tiny_model_dir.parent)
    for given, recorded in [
        (tiny_model_dir.name, str(tiny_model_dir.resolve())),
        ("org/not-local", "org/not-local"),
        ("", ""),
    ]:
        save_adapter(model, cfg, tmp_path / "a", base_model=given)
        assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model"] == recorded
