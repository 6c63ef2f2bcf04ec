"""Evaluation sized for the hardware: rows leave the batch when they finish (their slots refilled), the default
batch size from the model's KV cache on CUDA, the device each process folds and generates on, and how the
prompts are shared between processes. CUDA itself is not needed: its memory and device count are faked."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli
from transformers import LlamaConfig

from abba_cli.adapters.fold import fold_device
from abba_cli.eval import results as eval_results
from abba_cli.eval.batch_size import (
    CPU_BATCH_SIZE,
    MAX_CUDA_BATCH_SIZE,
    cuda_batch_size,
    default_batch_size,
    kv_bytes_per_token,
    row_bytes,
)
from abba_cli.eval.generate import generate
from abba_cli.eval.processes import EvalProcesses, eval_processes
from abba_cli.eval.target import load_model_for_eval

PROMPTS = [f"Natalia sold {i} clips" + " to her friends" * (i % 5) for i in range(10)]
MISTRAL = LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
)


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir):
    return load_model_for_eval(str(tiny_model_dir), None)


def _decode_rows(model) -> list[int]:
    """Rows of every forward pass of `model` (prefill and decode) while the returned list is live."""
    rows: list[int] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return rows


def test_finished_rows_leave_the_batch_and_outputs_do_not_change(tiny_loaded):
    model, tok, device = tiny_loaded
    free = generate(model, tok, PROMPTS, batch_size=4, max_new_tokens=16, device=device)
    # Stop strings the model really produces at different points, so rows finish at different steps.
    stops = sorted({text[5:7] for text in free if text[5:7].strip()})[:3]
    rows = _decode_rows(model)
    one, steps_alone = [], []
    for p in PROMPTS:
        rows.clear()
        one.append(generate(model, tok, [p], batch_size=1, max_new_tokens=16, stop=stops, device=device)[0])
        steps_alone.append(len(rows))
    rows.clear()
    batched = generate(model, tok, PROMPTS, batch_size=4, max_new_tokens=16, stop=stops, device=device)
    assert batched == one
    assert len(set(steps_alone)) > 1, steps_alone  # rows do finish at different steps
    # A batch that runs until its slowest row stops costs, per batch of 4 (longest prompts first), 4 x its
    # longest row's steps. Rows leaving and new prompts taking their slots must cost less.
    order = sorted(range(len(PROMPTS)), key=lambda i: len(tok(PROMPTS[i])["input_ids"]), reverse=True)
    whole_batches = sum(
        len(order[b : b + 4]) * max(steps_alone[i] for i in order[b : b + 4]) for b in range(0, len(order), 4)
    )
    assert sum(rows) < whole_batches, (sum(rows), whole_batches)


def test_kv_cache_bytes_follow_the_config():
    # Mistral-7B in bf16: 2 (K, V) x 32 layers x 8 KV heads x 128 dims x 2 bytes per token.
    assert kv_bytes_per_token(MISTRAL, torch.bfloat16) == 2 * 32 * 8 * 128 * 2
    assert kv_bytes_per_token(MISTRAL, torch.float32) == 2 * kv_bytes_per_token(MISTRAL, torch.bfloat16)
    longer = row_bytes(MISTRAL, torch.bfloat16, 700, 1024)
    assert (
        longer
        > row_bytes(MISTRAL, torch.bfloat16, 700, 512)
        > kv_bytes_per_token(MISTRAL, torch.bfloat16) * 1212
    )


def test_cuda_batch_size_is_bounded_by_memory():
    gib = 2**30
    row = row_bytes(MISTRAL, torch.bfloat16, 700, 512)
    weights = 14 * gib
    on_80 = cuda_batch_size(80 * gib, weights, row)
    on_24 = cuda_batch_size(24 * gib, weights, row)
    assert on_80 == MAX_CUDA_BATCH_SIZE  # 7B on 80 GB: the cap, not memory, bounds it
    assert 1 <= on_24 < on_80 and on_24 & (on_24 - 1) == 0  # a power of two
    assert on_24 * row <= 24 * gib * 0.9 - weights  # it fits
    assert cuda_batch_size(24 * gib, weights, row * 4) < on_24  # longer rows, fewer of them
    assert cuda_batch_size(80 * gib, 140 * gib, row) == 1  # nothing fits: one row, not zero


def test_default_batch_size_on_cpu_and_on_a_faked_gpu(tiny_loaded, monkeypatch):
    model = tiny_loaded[0]
    assert default_batch_size(model, torch.device("cpu"), 100, 512) == CPU_BATCH_SIZE

    class Props:
        total_memory = 80 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    assert default_batch_size(model, torch.device("cuda", 0), 100, 512) == MAX_CUDA_BATCH_SIZE


def test_each_process_folds_and_generates_on_its_own_gpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    if not torch.cuda.is_available():
        assert fold_device() == torch.device("cpu")
        assert eval_processes() == EvalProcesses(0, 1, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert fold_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert fold_device() == torch.device("cuda", 3)  # not one torch.device("cuda") for every process


@pytest.mark.parametrize("count", [1, 2, 3])
def test_shares_cover_every_prompt_once_and_balance_lengths(count):
    lengths = [5, 90, 7, 300, 12, 44, 8, 61, 9, 120]
    shares = [EvalProcesses(r, count, torch.device("cpu")).share(lengths) for r in range(count)]
    assert sorted(i for s in shares for i in s) == list(range(len(lengths)))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    if count == 2:  # the longest prompts go to different processes
        assert {3, 9} & set(shares[0]) and {3, 9} & set(shares[1])


def test_resume_reuses_every_process_partial_predictions(tiny_model_dir, tmp_path):
    """An interrupted 2-process eval leaves two partial files; --resume (on any number of processes) reuses
    the rows of both and writes one results folder without them."""
    out = tmp_path / "results"
    args = ["eval", "--task", "gsm8k", "--model", tiny_model_dir, "--limit", "4", "--batch-size", "2"]
    args += ["--max-new-tokens", "4", "--out", out]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    task = out / "gsm8k"
    rows = [json.loads(x) for x in (task / "predictions.jsonl").read_text().splitlines()]
    key = json.loads((task / "metrics.json").read_text())["resume_key"]
    (task / "metrics.json").unlink()
    (task / "predictions.jsonl").unlink()
    marked = [{**r, "output": f"kept {r['id']}"} for r in rows]
    for rank, part in ((0, marked[:1]), (1, marked[1:3])):
        with eval_results.PartialPredictions(task, key, fresh=True, rank=rank) as partial:
            partial.append(part)
    assert len(eval_results.partial_files(task)) == 2
    refused = cli(*args)
    assert refused.exit_code == 2 and "3 predictions" in refused.output
    resumed = cli(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    got = [json.loads(x) for x in (task / "predictions.jsonl").read_text().splitlines()]
    assert [r["output"] for r in got[:3]] == [f"kept {r['id']}" for r in rows[:3]]
    assert got[3]["output"] == rows[3]["output"]  # generated again, as before
    metrics = json.loads((task / "metrics.json").read_text())
    assert (metrics["generated"], metrics["resumed"], metrics["processes"]) == (1, 3, 1)
    assert eval_results.partial_files(task) == []


def test_overwrite_drops_every_process_partial_file(tiny_model_dir, tmp_path, monkeypatch):
    """An --overwrite interrupted and then resumed must not reuse rows an older multi-process run left behind."""
    import abba_cli.eval.evaluate as evaluate

    out = tmp_path / "results"
    args = ["eval", "--task", "gsm8k", "--model", tiny_model_dir, "--limit", "2", "--batch-size", "1"]
    args += ["--max-new-tokens", "4", "--out", out]
    assert cli(*args).exit_code == 0
    task = out / "gsm8k"
    key = json.loads((task / "metrics.json").read_text())["resume_key"]
    with eval_results.PartialPredictions(task, key, fresh=True, rank=3) as stale:  # an older 4-process run's
        stale.append([{"id": f"gsm8k-{i}", "prompt": "p", "output": "stale"} for i in range(2)])
    real = evaluate.generate_batches

    def stop_after_first(*a, **k):
        for batch in real(*a, **k):
            yield batch
            raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "generate_batches", stop_after_first)
    assert cli(*args, "--overwrite").exit_code != 0
    monkeypatch.setattr(evaluate, "generate_batches", real)
    resumed = cli(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "stale" not in (task / "predictions.jsonl").read_text()
    assert eval_results.partial_files(task) == []
