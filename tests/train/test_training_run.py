"""Training: run directory contents, refusal to overwrite, exact resume, non-finite stop, data order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import UNSET, bundled_gsm8k_data, replace_training_loss, tiny_config, train_cli
from safetensors.torch import load_file
from typer.testing import CliRunner

from abba_cli.cli import app
from abba_cli.config import load_config
from abba_cli.data.order import batch_stream, epoch_order
from abba_cli.errors import UserError
from abba_cli.run.latest import resolve_run
from abba_cli.run.layout import base_model_reference
from abba_cli.train.loss import target_loss_sum
from abba_cli.train.pipeline import run_training
from abba_cli.train.setup import count_total_steps, micro_batches_per_epoch

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, model_dir: Path, out: str = "run", **train) -> Path:
    # Dropout on, so an exact resume also needs the restored torch RNG; all seven projections (the default
    # targets). The tiny tokenizer spends many tokens per GSM8K problem, hence the long max_seq_len.
    return tiny_config(
        tmp_path,
        model_dir,
        out,
        model={"dtype": UNSET},
        adapter={"dropout": 0.1, "target_modules": UNSET},
        data=bundled_gsm8k_data(10),
        train={"grad_accum_steps": 1, **train},
    )


def test_two_steps_write_a_loadable_run_dir(tmp_path, tiny_model_dir):
    from abba_cli.adapters import adapter_state_dict, load_adapter
    from abba_cli.models.loading import load_base

    result = train_cli(_config(tmp_path, tiny_model_dir))
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert str(run) in result.stdout  # says where the outputs went
    assert resolve_run(None) == run.resolve()  # the latest-run marker points here
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(m)
        assert m["tokens_per_s"] > 0  # the loss values themselves: tests/train/test_step_math.py
    assert load_config(run / "config.yaml").output_dir == str(run)  # the resolved config reloads

    weights = load_file(run / "adapter_model.safetensors")
    model, _ = load_base(str(tiny_model_dir))
    load_adapter(model, run)
    loaded = adapter_state_dict(model)
    assert set(loaded) == set(weights)
    assert all(torch.equal(loaded[k].cpu(), weights[k]) for k in weights)
    assert any(
        w.abs().sum() > 0 for k, w in weights.items() if k.endswith(".B2")
    )  # B2 starts at 0: it trained


def test_existing_output_dir_is_refused(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    result = train_cli(_config(tmp_path, tiny_model_dir))
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "--resume" in result.stderr
    assert (run / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in run.iterdir()) == ["precious.txt"]


def test_dry_run_writes_nothing(tmp_path, tiny_model_dir):
    result = train_cli(_config(tmp_path, tiny_model_dir), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "optimizer steps" in result.stderr and "trainable" in result.stderr
    assert not (tmp_path / "run").exists()


def test_resume_without_a_run_is_refused(tmp_path, tiny_model_dir):
    result = train_cli(_config(tmp_path, tiny_model_dir), "--resume")
    assert result.exit_code == 2 and "no run to resume" in result.stderr


def _interrupt_after(monkeypatch, calls: int) -> None:
    """Raise KeyboardInterrupt at the `calls`+1-th micro-batch loss, as a Ctrl-C or a kill would."""
    real = target_loss_sum
    count = {"n": 0}

    def flaky(logits, labels):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return real(logits, labels)

    replace_training_loss(monkeypatch, flaky)


def test_resume_mid_epoch_is_bitwise_exact(tmp_path, tiny_model_dir, monkeypatch):
    # 10 examples, micro-batch 2 -> 5 micro-batches per epoch; 2 per step -> checkpoint at step 2 sits mid-epoch
    # (epoch 0, batch 4) and steps 3..5 cross into epoch 1.
    settings = dict(
        max_steps=5,
        grad_accum_steps=2,
        save_every=2,
        save_total_limit=5,
        scheduler="cosine",
        warmup_ratio=0.2,
    )
    whole = _config(tmp_path, tiny_model_dir, "whole", **settings)
    assert train_cli(whole).exit_code == 0

    split = _config(tmp_path, tiny_model_dir, "split", **settings)
    _interrupt_after(monkeypatch, calls=6)  # dies inside step 4, after checkpoint step-2
    result = train_cli(split)
    assert result.exit_code == 130
    run = tmp_path / "split"
    assert not (run / "adapter_model.safetensors").exists()
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-2"]
    state = json.loads((run / "checkpoints" / "step-2" / "state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 4)
    monkeypatch.undo()

    result = train_cli(split, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.stderr
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(run / "adapter_model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = lambda p: [json.loads(x)["loss"] for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(tmp_path / "whole") == losses(
        run
    )  # metrics past the checkpoint were dropped, then rewritten
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4", "step-5"]


def test_save_total_limit_prunes_old_checkpoints(tmp_path, tiny_model_dir):
    result = train_cli(_config(tmp_path, tiny_model_dir, max_steps=3, save_every=1, save_total_limit=2))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-2", "step-3"]


def test_resume_with_a_changed_config_is_refused(tmp_path, tiny_model_dir):
    path = _config(tmp_path, tiny_model_dir, save_every=1)
    assert train_cli(path).exit_code == 0
    result = train_cli(path, "--resume", "--set", "train.lr=0.5")
    assert result.exit_code == 2 and "train.lr" in result.stderr


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    real = target_loss_sum
    count = {"n": 0}

    def nan_at_third(logits, labels):
        count["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if count["n"] == 3 else loss

    replace_training_loss(monkeypatch, nan_at_third)
    cfg = load_config(_config(tmp_path, tiny_model_dir, max_steps=4, save_every=1))
    with pytest.raises(UserError, match=r"non-finite loss or weights at step 3; loss nan;.*step-2"):
        run_training(cfg, config_path="x", resume=False, dry_run=False)
    run = tmp_path / "run"
    assert not (run / "adapter_model.safetensors").exists()
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-1", "step-2"]


def test_epoch_order_is_seeded_and_batches_cover_each_epoch():
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    stream = batch_stream(10, 3, seed=7, world=1, rank=0, skip=0, per_epoch=4)
    first = [next(stream) for _ in range(4)]
    assert sorted(i for _, _, idx in first for i in idx) == list(range(10))
    assert [(e, b) for e, b, _ in first] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    # Skipping k micro-batches lands exactly where an uninterrupted stream would be, across epochs.
    full = batch_stream(10, 3, seed=7, world=1, rank=0, skip=0, per_epoch=4)
    ref = [next(full) for _ in range(11)]
    resumed = batch_stream(10, 3, seed=7, world=1, rank=0, skip=6, per_epoch=4)
    assert [next(resumed) for _ in range(5)] == ref[6:]


def test_batches_split_across_processes():
    per_epoch = micro_batches_per_epoch(10, 2, world=2)  # 3 global micro-batches of 4
    streams = [batch_stream(10, 2, 7, 2, r, 0, per_epoch) for r in (0, 1)]
    seen = []
    for _ in range(per_epoch):
        a, b = (next(s)[2] for s in streams)
        assert len(a) == len(b) == 2 and not set(a) & set(b)
        seen += a + b
    assert set(seen) == set(range(10))  # all covered; the last batch wraps around to stay full


def test_total_steps():
    assert count_total_steps(None, 2.0, 10, 3) == 7
    assert count_total_steps(5, 2.0, 10, 3) == 5
    assert count_total_steps(None, 0.01, 10, 3) == 1


@pytest.mark.slow
def test_smollm2_end_to_end_loss_falls(tmp_path, smollm2_dir):
    """The real bundled model through the quickstart config, shortened: the training loss goes down."""
    # One example seen five times at a constant lr: small enough for a shared 2-core CPU, and the loss on it
    # must fall well below its start (with several examples the per-example spread hides a short run's trend).
    overrides = [
        f"output_dir={tmp_path / 'smol'}",
        "data.num_samples=1",
        "data.max_seq_len=512",
        "train.micro_batch_size=1",
        "train.max_steps=5",
        "train.lr=3e-3",
        "train.scheduler=constant",
        "train.warmup_ratio=0",
        "train.save_every=null",
    ]
    result = CliRunner().invoke(
        app,
        ["train", str(ROOT / "configs" / "quickstart.yaml"), *[x for o in overrides for x in ("--set", o)]],
    )
    assert result.exit_code == 0, result.output
    assert "bundled copy" in result.stderr
    losses = [json.loads(x)["loss"] for x in (tmp_path / "smol" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 5
    assert losses[-1] < losses[0] * 0.8, losses
    cfg = json.loads((tmp_path / "smol" / "adapter_config.json").read_text())
    assert "SmolLM2-135M-Instruct" in json.dumps(cfg)


def test_adapter_base_model_is_recorded_as_an_absolute_path(tmp_path, tiny_model_dir, monkeypatch):
    """A relative local base path in the config still resolves when eval/merge run from another directory."""
    monkeypatch.chdir(tiny_model_dir.parent)
    cfg = _config(tmp_path, Path(tiny_model_dir.name))
    result = train_cli(cfg)
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["base_model"]
    assert recorded == str(tiny_model_dir.resolve())
    assert (
        base_model_reference("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


# Sharded (FSDP2, ZeRO-3) checkpoints and final adapters are checked on real 2-process runs:
# tests/train/test_distributed_strategies.py (test_the_checkpoint_holds_what_the_engine_needs, test_zero3_saves_full_adapter_tensors).
