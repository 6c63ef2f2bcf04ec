"""What the README promises about training, each run on the tiny fixture model: mixed precision (bf16 autocast on
CPU, adapter weights kept fp32), gradient checkpointing (same loss and adapter, activations really recomputed),
report_to trackers, the "same number of processes" resume rule, and `make demo` itself (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cli, reset_accelerate, tiny_raw_config, train_in_process, write_jsonl

from abba_cli.config import RunConfig
from abba_cli.errors import UserError
from abba_cli.train.pipeline import run_training

ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    {
        "question": "Natalia sold 48 clips" + " to her friends" * k + "?",
        "answer": "so " * (2 * k) + f"#### {k}",
    }
    for k in (0, 2, 1, 3)
]


def _raw(tmp_path: Path, model_dir: Path, out: str, **train) -> dict:
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    targets = ["q_proj", "v_proj", "down_proj"]
    return tiny_raw_config(
        tmp_path, model_dir, out, adapter={"target_modules": targets}, data={"path": str(data)}, train=train
    )


@pytest.fixture(autouse=True)
def _no_accelerate_state_left_behind():
    yield
    reset_accelerate()  # a bf16 state would make later in-process runs (mixed_precision "no") fail


def _train(tmp_path: Path, model_dir: Path, out: str, **train) -> tuple[list[dict], dict[str, torch.Tensor]]:
    return train_in_process(RunConfig.model_validate(_raw(tmp_path, model_dir, out, **train)))


# ----------------------------------------------------------------------------------------------- precision


def test_bf16_mixed_precision_autocasts_and_keeps_fp32_adapter_weights(tmp_path, tiny_model_dir):
    ref, _ = _train(tmp_path, tiny_model_dir, "fp32")
    got, weights = _train(tmp_path, tiny_model_dir, "bf16", mixed_precision="bf16", save_every=2)
    # Autocast really ran (bf16 matmuls round differently) and stayed close to the fp32 loss.
    assert got[0]["loss"] != ref[0]["loss"]
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], rel=2e-2)
    assert {w.dtype for w in weights.values()} == {torch.float32}
    # The optimizer updated fp32 master weights: its moments are fp32 too.
    opt = torch.load(tmp_path / "bf16" / "checkpoints" / "step-2" / "optimizer.pt", weights_only=True)
    moments = [s["exp_avg"] for s in opt["state"].values()]
    assert moments and {m.dtype for m in moments} == {torch.float32}


def test_gradient_checkpointing_recomputes_and_trains_the_same_adapter(tmp_path, tiny_model_dir, monkeypatch):
    # Counted inside the decoder layer (its MLP): transformers wraps the layer's own forward to checkpoint it.
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls = {"n": 0}
    real_forward = LlamaMLP.forward

    def counting_forward(self, *args, **kwargs):
        calls["n"] += 1
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaMLP, "forward", counting_forward)
    plain_metrics, plain = _train(tmp_path, tiny_model_dir, "plain")
    plain_calls, calls["n"] = calls["n"], 0
    ckpt_metrics, ckpt = _train(tmp_path, tiny_model_dir, "ckpt", gradient_checkpointing=True)
    # 2 layers x 2 steps forward; checkpointing runs each layer's forward again in backward.
    assert (plain_calls, calls["n"]) == (4, 8)
    assert [m["loss"] for m in ckpt_metrics] == pytest.approx([m["loss"] for m in plain_metrics], rel=1e-5)
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-5, atol=1e-6)
    assert any(float(plain[k].abs().max()) > 0 for k in plain if k.endswith(".B2"))


# ----------------------------------------------------------------------------------------------- trackers


def test_report_to_tensorboard(tmp_path, tiny_model_dir):
    raw = _raw(tmp_path, tiny_model_dir, "run", report_to=["tensorboard"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = cli(*["train", str(path)])
    if importlib.util.find_spec("tensorboard") is None:
        # Not installed (it is an extra): one line naming the key and how to install it, nothing written.
        assert result.exit_code == 2, result.output
        assert "train.report_to" in result.stderr and "pip install 'abba-cli[tensorboard]'" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "run").exists()
    else:
        # Installed: the offline TensorBoard writer leaves an event file under the run directory.
        assert result.exit_code == 0, result.output
        assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


# ----------------------------------------------------------------------------------------------- resume


def test_resume_with_another_number_of_processes_is_refused(tmp_path, tiny_model_dir):
    """A checkpoint written by 2 processes holds 2 RNG states and a 2-process data position: 1 process must not
    continue from it (the README's "resume with the same number of processes")."""
    _train(tmp_path, tiny_model_dir, "run", save_every=1, save_total_limit=2)
    run = tmp_path / "run"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (run / name).unlink()
    step1 = run / "checkpoints" / "step-1"
    shutil.rmtree(run / "checkpoints" / "step-2")
    rng = torch.load(step1 / "rng.pt", weights_only=True)
    assert len(rng) == 1
    torch.save([rng[0], rng[0]], step1 / "rng.pt")  # as a 2-process run saves it

    cfg = RunConfig.model_validate(_raw(tmp_path, tiny_model_dir, "run", save_every=1, save_total_limit=2))
    with pytest.raises(UserError, match=r"step-1: saved by 2 process\(es\).* 1.*same number of processes"):
        run_training(cfg, config_path="test", resume=True)
    assert not (run / "adapter_model.safetensors").exists()


# ----------------------------------------------------------------------------------------------- make demo


@pytest.mark.slow
def test_make_demo_runs_on_the_tiny_model(tmp_path, tiny_model_dir):
    """scripts/demo.sh as `make demo` runs it, pointed at the tiny model: train, eval before/after, merge, table."""
    config = tmp_path / "demo.yaml"
    raw = _raw(tmp_path, tiny_model_dir, "unused", save_every=1)
    raw["data"] = {"recipe": "commonsense_bundled_train", "num_samples": 4, "max_seq_len": 512}
    config.write_text(yaml.safe_dump(raw))
    demo = tmp_path / "demo"
    env = dict(
        os.environ,
        ABBA=str(Path(sys.executable).parent / "abba"),
        PY=sys.executable,
        DEMO_DIR=str(demo),
        DEMO_CONFIG=str(config),
        DEMO_BASE=str(tiny_model_dir),
        DEMO_TASKS="boolq,piqa",
        DEMO_LIMIT="2",
        DEMO_MAX_NEW_TOKENS="4",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (demo / "run" / "adapter_model.safetensors").is_file()
    for which in ("eval_base", "eval"):
        for task in ("boolq", "piqa"):
            assert json.loads((demo / which / task / "metrics.json").read_text())["n"] == 2
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(demo / "merged")  # a plain HF folder
    assert merged.config.hidden_size == 64
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table] == ["task", "boolq", "piqa", "all"]
