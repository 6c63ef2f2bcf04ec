"""Held-out validation loss during training: data.val_samples / data.val_path, train.eval_every, val_loss.

The reference loss is computed here independently: the saved adapter is loaded into a fresh base model and the
loss is summed one example at a time (no padding, no batching) in float64, then divided by the target count.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import gsm8k_rows, replace_training_loss, tiny_config, train_cli, write_jsonl
from safetensors.torch import load_file

from abba_cli.data.recipes import load_split
from abba_cli.train.loss import target_loss_sum
from abba_cli.train.val_loss import validation_loss

_rows = gsm8k_rows


_jsonl = write_jsonl


def _config(
    tmp_path: Path, model_dir: Path, out: str = "run", data: dict | None = None, dropout: float = 0.1, **train
) -> Path:
    # Dropout on: validation must run in eval mode (and draw nothing) to match the reference below.
    rows = str(write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(12)))
    return tiny_config(
        tmp_path,
        model_dir,
        out,
        adapter={"dropout": dropout},
        data={"path": rows, **(data or {})},
        train={"max_steps": 3, **train},
    )


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _reference_val_loss(model_dir: Path, run: Path, examples, train_on_inputs: bool) -> float:
    """Mean next-token loss per target token of `examples` under the run's final adapter, in float64."""
    from abba_cli.adapters import load_adapter
    from abba_cli.data.tokenize import build_train_dataset
    from abba_cli.models.loading import load_base

    model, tokenizer = load_base(str(model_dir), "float32")
    load_adapter(model, run)
    model.eval()
    ds = build_train_dataset(examples, tokenizer, 256, train_on_inputs)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ds:
            ids = torch.tensor([row["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            for pos in range(1, len(row["labels"])):
                if row["labels"][pos] != -100:
                    total -= float(logp[pos - 1, row["labels"][pos]])
                    count += 1
    return total / count


def test_held_out_set_is_disjoint_seeded_and_independent_of_num_samples(tmp_path):
    path = str(_jsonl(tmp_path / "rows.jsonl", _rows(40)))
    ids = lambda examples: [e.id for e in examples]  # noqa: E731
    all_train, held = load_split("gsm8k", path=path, skip=5, seed=3, held_out=6)
    assert len(held) == 6 and len(all_train) == 40 - 5 - 6
    assert not set(ids(held)) & set(ids(all_train))  # disjoint by construction
    assert set(ids(held)) | set(ids(all_train)) == set(ids(load_split("gsm8k", path=path, skip=5)[0]))
    for n in (4, 20, 29):
        train, held_n = load_split("gsm8k", path=path, skip=5, seed=3, held_out=6, num_samples=n)
        assert ids(held_n) == ids(held)  # the same held-out set whatever num_samples is ...
        assert len(train) == n and set(ids(train)) <= set(ids(all_train))  # ... and num_samples still counts
    assert ids(load_split("gsm8k", path=path, skip=5, seed=4, held_out=6)[1]) != ids(held)  # seeded
    # The same selection in another process, whatever its hash seed (string seeds must not use hash()).
    code = (
        "import json,sys; from abba_cli.data.recipes import load_split; "
        f"print(json.dumps([e.id for e in load_split('gsm8k', path={path!r}, skip=5, seed=3, held_out=6)[1]]))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == ids(held)


@pytest.mark.parametrize("train_on_inputs", [False, True], ids=["responses", "train_on_inputs"])
def test_val_loss_matches_an_independent_computation(tmp_path, tiny_model_dir, train_on_inputs):
    from abba_cli.data.recipes import load_examples

    val_file = _jsonl(tmp_path / "val.jsonl", _rows(3, offset=100))  # 3 examples in micro-batches of 2
    # A large lr and dropout, so the trained adapter moves the loss well beyond the tolerance, with and without
    # dropout (validation in training mode would be caught).
    data = {"val_path": str(val_file), "train_on_inputs": train_on_inputs}
    cfg = _config(tmp_path, tiny_model_dir, data=data, dropout=0.5, lr=0.1)
    result = train_cli(cfg)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    records = _records(run)
    assert [r["step"] for r in records if "val_loss" in r] == [3]  # no eval_every: at the end only
    assert "at the end only" in result.stderr
    want = _reference_val_loss(
        tiny_model_dir, run, load_examples("gsm8k", path=str(val_file)), train_on_inputs
    )
    assert records[-1]["val_loss"] == pytest.approx(want, rel=1e-5)
    summary = json.loads((run / "val_summary.json").read_text())
    assert summary["best_val_step"] == 3 and summary["best_val_loss"] == records[-1]["val_loss"]


def test_eval_every_cadence_best_step_and_held_out_loss(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, data={"val_samples": 3}, max_steps=5, eval_every=2, log_every=3)
    result = train_cli(cfg)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    records = _records(run)
    # One record per step that was logged or evaluated; evaluated steps carry val_loss (and the final step).
    assert [r["step"] for r in records] == [2, 3, 4, 5]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 5]
    assert all("loss" in r for r in records)
    vals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    best_step = min(vals, key=vals.get)
    summary = json.loads((run / "val_summary.json").read_text())
    assert (summary["best_val_step"], summary["best_val_loss"]) == (best_step, vals[best_step])
    assert (summary["last_val_step"], summary["last_val_loss"]) == (5, vals[5])
    assert "val_loss" in result.stderr
    # The held-out examples are those load_split sets aside, and the final val_loss is their loss.
    _, held = load_split("gsm8k", path=str(tmp_path / "train.jsonl"), seed=42, held_out=3)
    assert vals[5] == pytest.approx(_reference_val_loss(tiny_model_dir, run, held, False), rel=1e-5)
    assert "9 training examples" in result.stderr  # 12 rows, 3 held out


def test_validation_never_changes_training(tmp_path, tiny_model_dir):
    """Evaluating every step draws no randomness: with dropout on, training is identical to evaluating once."""
    every = _config(tmp_path, tiny_model_dir, "every", data={"val_samples": 3}, max_steps=4, eval_every=1)
    once = _config(tmp_path, tiny_model_dir, "once", data={"val_samples": 3}, max_steps=4)
    assert train_cli(every).exit_code == 0 and train_cli(once).exit_code == 0
    a, b = (
        load_file(tmp_path / "every" / "adapter_model.safetensors"),
        load_file(tmp_path / "once" / "adapter_model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _records(tmp_path / "every")] == [
        r["loss"] for r in _records(tmp_path / "once")
    ]
    assert _records(tmp_path / "every")[-1]["val_loss"] == _records(tmp_path / "once")[-1]["val_loss"]


def test_resume_with_eval_every_is_bitwise_exact(tmp_path, tiny_model_dir, monkeypatch):
    settings = dict(max_steps=6, grad_accum_steps=2, save_every=2, save_total_limit=5, eval_every=3)
    data = {"val_samples": 3}
    whole = _config(tmp_path, tiny_model_dir, "whole", data=data, **settings)
    assert train_cli(whole).exit_code == 0

    split = _config(tmp_path, tiny_model_dir, "split", data=data, **settings)
    real, calls = target_loss_sum, {"n": 0}

    def interrupted(logits, labels):
        calls["n"] += 1
        # Steps 1-3 (2 micro-batches each) and step 3's validation (2 batches) pass; step 4 dies.
        if calls["n"] > 8:
            raise KeyboardInterrupt
        return real(logits, labels)

    replace_training_loss(monkeypatch, interrupted)
    assert train_cli(split).exit_code == 130
    run = tmp_path / "split"
    assert [r["step"] for r in _records(run)] == [1, 2, 3]  # step 3's validation was logged, then killed
    monkeypatch.undo()

    result = train_cli(split, "--resume")  # from step-2: step 3 and its validation run again
    assert result.exit_code == 0, result.output
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(run / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rs]  # noqa: E731
    assert strip(_records(run)) == strip(_records(tmp_path / "whole"))  # val_loss included, each step once
    assert [r["step"] for r in _records(run) if "val_loss" in r] == [3, 6]
    summary = lambda p: json.loads((p / "val_summary.json").read_text())  # noqa: E731
    assert summary(run) == summary(tmp_path / "whole")


def test_best_val_step_survives_resume(tmp_path, tiny_model_dir):
    """A checkpoint written before it held the best-so-far state: the best step is replayed from metrics.jsonl on
    resume, so an earlier best is not forgotten."""
    cfg = _config(tmp_path, tiny_model_dir, data={"val_samples": 3}, max_steps=4, save_every=2, eval_every=1)
    assert train_cli(cfg).exit_code == 0
    run = tmp_path / "run"
    # Plant a best at step 1 (before the step-2 checkpoint that the resume below starts from).
    records = _records(run)
    records[0]["val_loss"] = 0.001
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (run / name).unlink()
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-4")
    state_file = run / "checkpoints" / "step-2" / "state.json"
    state_file.write_text(
        json.dumps({k: v for k, v in json.loads(state_file.read_text()).items() if k != "val_tracker"})
    )
    result = train_cli(cfg, "--resume")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "val_summary.json").read_text())
    assert (summary["best_val_step"], summary["best_val_loss"]) == (1, 0.001)
    assert summary["last_val_step"] == 4


@pytest.mark.parametrize(
    ("data", "train", "message"),
    [
        ({"val_samples": 2, "val_path": "v.jsonl"}, {}, "data.val_samples and data.val_path"),
        ({}, {"eval_every": 2}, "train.eval_every 2 needs validation data"),
        ({"val_samples": 12}, {}, "val_samples 12 leaves no training examples"),
        ({"val_samples": 0}, {}, "data.val_samples"),
    ],
    ids=["both-sources", "eval-without-data", "all-held-out", "zero"],
)
def test_validation_config_errors(tmp_path, tiny_model_dir, data, train, message):
    result = train_cli(_config(tmp_path, tiny_model_dir, data=data, **train))
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert message in line and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_val_loss_is_a_mean_over_tokens_not_batches():
    """Two batches of 1 and 3 target tokens: the mean is per token (float64 by hand), not per batch."""

    class OneProcess:
        num_processes, process_index, device = 1, 0, torch.device("cpu")

    class Fixed(torch.nn.Module):
        """Logits that put probability p on token 1 everywhere (vocab of 2)."""

        def forward(self, input_ids, attention_mask):
            logits = torch.tensor([0.0, 1.0]).expand(*input_ids.shape, 2)
            return type("Out", (), {"logits": logits})()

    rows = [
        {"input_ids": [0, 1], "labels": [-100, 1]},
        {"input_ids": [0, 1, 0, 1], "labels": [-100, 1, 0, 1]},
    ]

    def collate(features):
        n = max(len(f["input_ids"]) for f in features)
        pad = lambda xs, v: [x + [v] * (n - len(x)) for x in xs]  # noqa: E731
        return {
            "input_ids": torch.tensor(pad([f["input_ids"] for f in features], 0)),
            "labels": torch.tensor(pad([f["labels"] for f in features], -100)),
            "attention_mask": torch.ones(len(features), n, dtype=torch.long),
        }

    got = validation_loss(OneProcess(), Fixed(), rows, collate, micro_batch_size=1)
    p1 = math.e / (1 + math.e)
    want = (3 * -math.log(p1) + -math.log(1 - p1)) / 4  # targets 1, 1, 0, 1
    assert got["val_tokens"] == 4 and got["val_loss"] == pytest.approx(want, rel=1e-6)
