"""The offline fallback to the bundled SmolLM2, fast: a tiny model planted where the converted bundled copy is
cached stands in for the 35-second GGUF conversion, so the hub id resolves to it with the hub unreachable."""

from __future__ import annotations

import json
import shutil

import torch
from helpers import cli

from abba_cli.models import bundled
from abba_cli.models.bundled import SMOLLM2_ID
from abba_cli.models.loading import load_base


def _plant_bundled_copy(tmp_path, tiny_model_dir, monkeypatch):
    cache = tmp_path / "models"
    planted = cache / bundled.SMOLLM2_CACHE_NAME
    shutil.copytree(tiny_model_dir, planted)
    monkeypatch.setenv("ABBA_MODELS_DIR", str(cache))  # this cache only: nothing is converted here
    return planted


def test_hub_id_loads_the_bundled_copy_when_offline(tmp_path, tiny_model_dir, monkeypatch, capsys):
    planted = _plant_bundled_copy(tmp_path, tiny_model_dir, monkeypatch)
    model, tok = load_base(SMOLLM2_ID, "float32")
    err = capsys.readouterr().err
    assert f"using the bundled copy of {SMOLLM2_ID} at {planted}" in err
    assert model.config._name_or_path == SMOLLM2_ID  # runs and adapters name the real model
    reference, _ = load_base(str(tiny_model_dir), "float32")
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert tok.pad_token == "<|pad|>"


def test_eval_of_the_hub_id_offline_runs_on_the_bundled_copy(tmp_path, tiny_model_dir, monkeypatch):
    _plant_bundled_copy(tmp_path, tiny_model_dir, monkeypatch)
    out = tmp_path / "results"
    args = ["eval", "--task", "boolq", "--model", SMOLLM2_ID, "--limit", "1", "--max-new-tokens", "2"]
    result = cli(*[*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "bundled copy" in result.stderr
    metrics = json.loads((out / "boolq" / "metrics.json").read_text())
    assert (metrics["model"], metrics["n"]) == (SMOLLM2_ID, 1)
