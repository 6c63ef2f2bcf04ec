"""data.packing: the rows (seeded, deterministic, within max_seq_len), the batches (positions restart, no example
predicts another's first token), the same loss and gradients as the same examples unpacked (fp32), no attention
across examples, and a packed `abba train` that validates, resumes bit for bit, and `abba validate`'s line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_llama
from helpers import cli, gsm8k_rows, request_stop, tiny_config, write_jsonl
from safetensors.torch import load_file

from abba_cli.adapters import adapter_layers, inject_adapters
from abba_cli.config import AdapterConfig, RunConfig
from abba_cli.data.collate import DataCollator
from abba_cli.data.packing import PackedCollator, pack_rows
from abba_cli.data.tokenize import IGNORE_INDEX
from abba_cli.train.loss import count_targets, micro_batch_loss

VOCAB = 96
PAD = 1


def _examples(lengths: list[int], seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(2, VOCAB, (n,), generator=gen).tolist()
        prompt = n // 3  # a masked prompt, then targets
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "length": n})
    return out


def test_rows_hold_every_example_once_within_the_row_size():
    lengths = [int(x) for x in torch.randint(1, 40, (200,), generator=torch.Generator().manual_seed(1))]
    rows = pack_rows(lengths, 48, seed=7)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 48 for r in rows)
    # First fit decreasing stays within 11/9 OPT + 1 rows; the lower bound is the total over the row size.
    assert len(rows) <= 11 / 9 * -(-sum(lengths) // 48) + 1
    assert pack_rows(lengths, 48, seed=7) == rows  # a function of (lengths, size, seed) only
    assert pack_rows(lengths, 48, seed=8) != rows  # the seed orders equal lengths


def test_a_packed_batch_restarts_positions_and_ignores_each_first_target():
    a, b = _examples([4, 3])
    a["labels"] = list(a["input_ids"])  # every label a target: the first must still be ignored once packed
    batch = PackedCollator(PAD, 10)([[a, b]])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]]
    assert batch["labels"][0, :7].tolist() == [
        IGNORE_INDEX,
        *a["input_ids"][1:],
        IGNORE_INDEX,
        *b["labels"][1:],
    ]
    assert batch["labels"][0, 7:].tolist() == [IGNORE_INDEX] * 3 and batch["num_tokens"] == 7
    assert "attention_mask" not in batch  # the backend isolates examples from the position ids
    flat = PackedCollator(PAD, 10, flatten=True)([[a, b], [b]])
    assert flat["input_ids"].shape == (1, 20) and flat["position_ids"][0, 10:13].tolist() == [0, 1, 2]


def test_flattened_rows_give_flash_attention_each_example_as_a_sequence():
    # What transformers' FlashAttention path reads from position ids on a one-row batch (no GPU needed here).
    from transformers.modeling_flash_attention_utils import (
        _is_packed_sequence,
        prepare_fa_kwargs_from_position_ids,
    )

    a, b, c = _examples([4, 3, 6])
    flat = PackedCollator(PAD, 8, flatten=True)([[a, b], [c]])
    assert _is_packed_sequence(flat["position_ids"], batch_size=1)
    (cu_seqlens, _), (max_len, _) = prepare_fa_kwargs_from_position_ids(flat["position_ids"])
    assert cu_seqlens.tolist() == [0, 4, 7, 8, 14, 16]  # a, b, the row's padding, c, its padding
    assert max_len == 6


def test_chat_conversations_pack_with_their_assistant_masks():
    from conftest import build_tiny_tokenizer

    from abba_cli.data.formats import ChatExample
    from abba_cli.data.packing import PackedRows
    from abba_cli.data.tokenize import build_train_dataset

    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    chats = [
        ChatExample(
            f"c-{i}",
            (
                {"role": "user", "content": f"What is {i} * 7?"},
                {"role": "assistant", "content": f"The answer is: {7 * i}"},
            ),
        )
        for i in range(6)
    ]
    ds = build_train_dataset(chats, build_tiny_tokenizer(), 512, chat_template=template)
    rows = PackedRows(ds, 2 * max(ds["length"]), seed=0)
    assert len(rows) < len(chats)
    batch = PackedCollator(PAD, rows.max_len)([rows[i] for i in range(len(rows))])
    # Every assistant token of every conversation is a target once packed, and nothing else is.
    want = sorted(t for e in ds for t in e["labels"][1:] if t != IGNORE_INDEX)
    assert sorted(t for t in batch["labels"].flatten().tolist() if t != IGNORE_INDEX) == want
    assert count_targets(batch["labels"]) == len(want)


def _model(attn: str, adapter: str = "abba"):
    model = build_tiny_llama(VOCAB, seed=2, tie_word_embeddings=True, attn_implementation=attn).float()
    cfg = {"abba": dict(type="abba", r1=2, r2=2, alpha=2.0), "lora": dict(type="lora", r=4, alpha=8.0)}[
        adapter
    ]
    inject_adapters(model, AdapterConfig(**cfg, target_modules=["q_proj", "v_proj", "down_proj"]), seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.factors().values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _loss_grads(model, batches: list[dict], impl: str) -> tuple[float, int, dict]:
    model.zero_grad(set_to_none=True)
    total, targets = 0.0, 0
    for batch in batches:
        loss = micro_batch_loss(model, batch, impl)
        loss.backward()
        total += float(loss.detach())
        targets += count_targets(batch["labels"])
    return total, targets, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("attn", "impl"), [("sdpa", "full"), ("eager", "full"), ("sdpa", "chunked")])
def test_packed_and_unpacked_give_the_same_loss_and_gradients(attn, impl):
    examples = _examples([9, 5, 13, 4, 7, 11, 6])
    rows = pack_rows([e["length"] for e in examples], 16, seed=0)
    assert len(rows) < len(examples)  # something was packed together
    model = _model(attn)
    unpacked = [DataCollator(PAD)(examples[:4]), DataCollator(PAD)(examples[4:])]
    packed = [PackedCollator(PAD, 16)([[examples[i] for i in r] for r in rows])]
    loss_u, n_u, grads_u = _loss_grads(model, unpacked, impl)
    loss_p, n_p, grads_p = _loss_grads(model, packed, impl)
    assert n_p == n_u  # the same targets, so the global normalisation is the same
    assert loss_p == pytest.approx(loss_u, rel=1e-6)
    for name, ref in grads_u.items():
        assert (grads_p[name] - ref).abs().max() <= 1e-5 * ref.abs().max(), name


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_an_example_is_not_changed_by_what_it_is_packed_with(attn):
    model = _model(attn, "lora").eval()
    a, b, c = _examples([6, 5, 9], seed=4)
    collate = PackedCollator(PAD, 20)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([a["input_ids"]])).logits[0]
        after_b = model(**_inputs(collate([[b, a]]))).logits[0, 5:11]
        after_c = model(**_inputs(collate([[c, a]]))).logits[0, 9:15]
        before_c = model(**_inputs(collate([[a, c]]))).logits[0, :6]
    for got in (after_b, after_c, before_c):
        assert (got - alone).abs().max() <= 1e-5 * alone.abs().max()
    # Not vacuous: attending across the boundary (one plain causal row) changes a's logits.
    joined = torch.tensor([b["input_ids"] + a["input_ids"]])
    with torch.no_grad():
        crossed = model(input_ids=joined).logits[0, 5:11]
    assert (crossed - alone).abs().max() > 1e-2 * alone.abs().max()


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "position_ids")} | {"use_cache": False}


def _raw(**data) -> dict:
    return {"model": {"name_or_path": "m"}, "data": {"recipe": "gsm8k", **data}, "output_dir": "o"}


def test_packing_refuses_grouping_and_an_unverified_backend():
    from abba_cli.data.packing import check_packing
    from abba_cli.errors import UserError

    with pytest.raises(UserError, match="data.packing and data.group_by_length"):
        check_packing(RunConfig(**_raw(packing=True, group_by_length=True)))
    raw = _raw(packing=True)
    raw["model"]["attn_implementation"] = "flash_attention_4"
    with pytest.raises(UserError, match="data.packing with model.attn_implementation 'flash_attention_4'"):
        check_packing(RunConfig(**raw))
    check_packing(RunConfig(**_raw(packing=True)))  # sdpa, the default, isolates examples


def _config(tmp_path, model_dir, out: str, **train):
    write_jsonl(tmp_path / "rows.jsonl", gsm8k_rows(20))
    return tiny_config(
        tmp_path,
        model_dir,
        out,
        data={"path": str(tmp_path / "rows.jsonl"), "packing": True, "val_samples": 4, "max_seq_len": 160},
        train={"max_steps": 3, "micro_batch_size": 1, "save_every": 1, "eval_every": 2, **train},
    )


def test_packed_training_validates_and_resumes_bit_for_bit(tmp_path, tiny_model_dir, monkeypatch):
    whole = _config(tmp_path, tiny_model_dir, "whole")
    result = cli("train", whole)
    assert result.exit_code == 0, result.output
    assert "packing: 16 examples in " in result.stderr and "examples per row" in result.stderr
    metrics = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [("val_loss" in m) for m in metrics] == [False, True, True]
    split = _config(tmp_path, tiny_model_dir, "split")
    request_stop(monkeypatch)
    assert cli("train", split).exit_code == 143
    monkeypatch.undo()
    result = cli("train", split, "--resume")
    assert result.exit_code == 0, result.output
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert resumed == [
        {**m, "elapsed_s": r["elapsed_s"], "tokens_per_s": r["tokens_per_s"]}
        for m, r in zip(metrics, resumed, strict=True)
    ]


def test_validate_prints_rows_examples_per_row_and_padding(tmp_path, tiny_model_dir):
    result = cli("validate", _config(tmp_path, tiny_model_dir, "v"))
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("# packing:"))
    assert "16 examples in " in line and "examples per row" in line and "padding " in line
