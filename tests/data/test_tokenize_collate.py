"""Tokenisation, label masking, truncation and collation on the tiny in-memory tokenizer."""

from __future__ import annotations

import pytest
from conftest import build_tiny_tokenizer
from tokenizers import processors

from abba_cli.data.collate import make_collator
from abba_cli.data.prompts import render_prompt
from abba_cli.data.recipes import Example
from abba_cli.data.tokenize import IGNORE_INDEX, build_train_dataset
from abba_cli.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _ex(
    i: int, instruction: str = "What is 6 * 7?", output: str = "6 * 7 = 42\nThe answer is: 42"
) -> Example:
    return Example(id=f"ex-{i}", instruction=instruction, input=None, output=output, gold="42")


def test_prompt_tokens_are_masked_response_and_eos_are_not(tok):
    ex = _ex(0)
    ds = build_train_dataset([ex], tok, max_seq_len=512)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    prompt_ids = tok(render_prompt(ex.instruction))["input_ids"]
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids  # the prompt's tokens are a prefix: what evaluation feeds the model
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert tok.decode(ids[n:-1]) == ex.output


def test_train_on_inputs_keeps_every_label(tok):
    ds = build_train_dataset([_ex(0)], tok, max_seq_len=512, train_on_inputs=True)
    assert ds[0]["labels"] == ds[0]["input_ids"]


def test_truncation_keeps_the_prompt_and_cuts_the_response(tok):
    ex = _ex(0, output="The answer is: 42 " * 40)
    n_prompt = len(tok(render_prompt(ex.instruction))["input_ids"])
    ds = build_train_dataset([ex], tok, max_seq_len=n_prompt + 5)
    assert len(ds[0]["input_ids"]) == n_prompt + 5
    assert sum(label != IGNORE_INDEX for label in ds[0]["labels"]) == 5


def test_prompt_that_fills_max_seq_len_is_an_error_naming_the_example(tok):
    long_ex = _ex(7, instruction="Natalia sold clips to 48 of her friends in April. " * 20)
    n_prompt = len(tok(render_prompt(long_ex.instruction))["input_ids"])
    with pytest.raises(UserError) as err:
        build_train_dataset([_ex(0), long_ex], tok, max_seq_len=n_prompt)
    msg = str(err.value)
    assert "ex-7" in msg and str(n_prompt) in msg and f"max_seq_len {n_prompt}" in msg
    assert "data.max_seq_len" in msg


def test_drop_long_drops_over_long_examples_with_a_count(tok, capsys):
    long_ex = _ex(7, instruction="Natalia sold clips to 48 of her friends in April. " * 20)
    n_prompt = len(tok(render_prompt(long_ex.instruction))["input_ids"])
    ds = build_train_dataset([_ex(0), long_ex], tok, max_seq_len=n_prompt, drop_long=True)
    assert ds["id"] == ["ex-0"]
    assert "dropped 1 of 2 examples longer than data.max_seq_len" in capsys.readouterr().err


def test_bos_adding_tokenizer_keeps_prompt_a_prefix():
    tok = build_tiny_tokenizer()
    bos = tok.convert_tokens_to_ids("<|pad|>")  # any special id works as a stand-in BOS
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|pad|> $A", special_tokens=[("<|pad|>", bos)]
    )
    ex = _ex(0)
    ds = build_train_dataset([ex], tok, max_seq_len=512)
    ids = ds[0]["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1  # one BOS, at the start of the prompt only
    prompt_ids = tok(render_prompt(ex.instruction))["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids


def test_examples_without_output_or_none_at_all_are_errors(tok):
    with pytest.raises(UserError, match="empty"):
        build_train_dataset([], tok, max_seq_len=64)
    with pytest.raises(UserError, match="ex-3"):
        build_train_dataset([Example("ex-3", "q", None, None, "1")], tok, max_seq_len=64)


def test_input_field_is_part_of_the_masked_prompt(tok):
    ex = Example("e", "Add the numbers.", "2 and 3", "5", "5")
    ds = build_train_dataset([ex], tok, max_seq_len=512)
    n = len(tok(render_prompt(ex.instruction, ex.input))["input_ids"])
    assert ds[0]["labels"][:n] == [IGNORE_INDEX] * n and ds[0]["labels"][n] != IGNORE_INDEX


def test_collator_pads_dynamically_with_masked_labels(tok):
    ds = build_train_dataset([_ex(0), _ex(1, output="42")], tok, max_seq_len=512)
    batch = make_collator(tok)([ds[0], ds[1]])
    long, short = len(ds[0]["input_ids"]), len(ds[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(long, short))
    row = 1 if short < long else 0
    n = min(long, short)
    assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(long, short) - n)
    assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
    assert batch["labels"][row, :n].tolist() == ds[row]["labels"]
    padded = make_collator(tok, pad_to_multiple_of=64)([ds[0]])
    assert padded["input_ids"].shape[1] % 64 == 0
