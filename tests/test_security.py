"""Files are data, never code: no pickle of arbitrary objects, no remote code unless asked, safe YAML only."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cli

PACKAGE = Path(__file__).resolve().parents[1] / "abba_cli"


class _Payload:
    """Unpickling this calls open(marker, "w"): if the marker file appears, a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _sources() -> list[tuple[Path, ast.AST]]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    return [(f, ast.parse(f.read_text())) for f in files]


def test_package_loads_tensors_only_through_safetensors_or_weights_only_torch_load():
    found = 0
    for path, tree in _sources():
        for node, func in _calls(tree):
            if func.endswith("torch.load"):
                found += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kw and ast.literal_eval(kw["weights_only"]) is True, (
                    f"{path.name}:{node.lineno}: torch.load without weights_only=True"
                )
            assert not func.startswith(("pickle.", "dill.", "cloudpickle.", "joblib.")) or func.endswith(
                "UnpicklingError"
            ), f"{path.name}:{node.lineno}: {func}"
            assert func not in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"), (
                f"{path.name}:{node.lineno}: {func}; use yaml.safe_load"
            )
            for k in node.keywords:
                if k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant):
                    assert k.value.value is False, (
                        f"{path.name}:{node.lineno}: trust_remote_code hard-coded on"
                    )
    assert found >= 1  # the checkpoint loader is really checked, not vacuously


def _checkpoint(run_dir: Path, poison: str | None, marker: Path) -> Path:
    from abba_cli.train import checkpoint as ckpt

    state = ckpt.TrainState(
        step=1, epoch=0, batch_in_epoch=1, micro_batches_seen=1, elapsed_s=0.0, tokens_seen=9
    )
    path = ckpt.save_checkpoint(
        run_dir,
        state,
        {"layer.B1": torch.zeros(2, 2)},
        {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        {"last_epoch": 1},
        [ckpt.rng_state()],
        keep=None,
    )
    if poison is not None:
        torch.save({"state": _Payload(marker)}, path / poison)
    return path


def test_an_honest_checkpoint_round_trips_with_weights_only(tmp_path):
    from abba_cli.train import checkpoint as ckpt

    path = _checkpoint(tmp_path / "run", None, tmp_path / "marker")
    state, tensors, opt, sched, rngs = ckpt.load_checkpoint(path)
    assert state.step == 1 and tensors["layer.B1"].shape == (2, 2) and opt["param_groups"][0]["lr"] == 0.1
    # The restored RNG states are the saved ones: numpy's too, stored as a tensor for weights_only.
    import random

    import numpy as np

    ckpt.set_rng_state(rngs[0])
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.set_rng_state(rngs[0])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


@pytest.mark.parametrize("poison", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_checkpoint_holding_a_pickled_object_is_refused(tmp_path, poison):
    from abba_cli.errors import UserError
    from abba_cli.train import checkpoint as ckpt

    marker = tmp_path / "pwned"
    path = _checkpoint(tmp_path / "run", poison, marker)
    with pytest.raises(UserError, match="unreadable checkpoint"):
        ckpt.load_checkpoint(path)
    assert not marker.exists(), "unpickling ran code"


def test_resume_from_a_poisoned_checkpoint_is_exit_2_and_runs_nothing(tmp_path, tiny_model_dir):
    from abba_cli.config import dump_config, load_config

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    cfg = tmp_path / "cfg.yaml"
    run = tmp_path / "run"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_model_dir)},
                "adapter": {"r1": 2, "r2": 2, "target_modules": ["q_proj"]},
                "data": {"recipe": "gsm8k", "path": str(data), "max_seq_len": 256},
                "train": {"max_steps": 2},
                "output_dir": str(run),
            }
        )
    )
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(cfg)))
    marker = tmp_path / "pwned"
    _checkpoint(run, "rng.pt", marker)

    result = cli(*["train", str(cfg), "--resume"])
    assert result.exit_code == 2, result.output
    assert "unreadable checkpoint" in result.stderr and "Traceback" not in result.output
    assert not marker.exists()


def test_load_base_does_not_trust_remote_code_unless_asked(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abba_cli.config import ModelConfig
    from abba_cli.models.loading import load_base

    seen: list[tuple[str, object]] = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "absent")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))

    assert ModelConfig(name_or_path="x").trust_remote_code is False
    load_base(str(tiny_model_dir))
    assert seen and all(flag is False for _, flag in seen), seen
    assert {name for name, _ in seen} == {"AutoModelForCausalLM", "AutoTokenizer"}
    seen.clear()
    load_base(str(tiny_model_dir), trust_remote_code=True)  # only an explicit setting turns it on
    assert seen and all(flag is True for _, flag in seen), seen


@pytest.mark.parametrize("where", ["config", "recipe", "set"])
def test_yaml_python_tags_are_rejected_with_exit_2(tmp_path, tiny_model_dir, where):
    marker = tmp_path / "pwned"
    evil = f'!!python/object/apply:builtins.open ["{marker}", "w"]'
    good = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"recipe": "gsm8k"},
        "output_dir": str(tmp_path / "run"),
    }
    cfg = tmp_path / "cfg.yaml"
    args = ["validate", str(cfg)]
    if where == "config":
        cfg.write_text(f"model:\n  name_or_path: {evil}\ndata: {{recipe: gsm8k}}\noutput_dir: x\n")
    elif where == "recipe":
        recipe = tmp_path / "evil.yaml"
        recipe.write_text(f"name: evil\ndescription: {evil}\nkind: train\n")
        cfg.write_text(yaml.safe_dump({**good, "data": {"recipe": str(recipe)}}))
        args = ["train", str(cfg), "--dry-run"]
    else:
        cfg.write_text(yaml.safe_dump(good))
        args += ["--set", f"model.name_or_path={evil}"]

    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not marker.exists(), "a YAML tag ran code"
