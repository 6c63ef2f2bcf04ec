"""Training data: render, tokenise, mask the prompt, collate with dynamic padding.

The prompt is `render_prompt(instruction, input)`, the same string evaluation feeds the model, and the
target is `output` + EOS. Prompt and full text are encoded the same way (the tokenizer's own special-token
handling, so a BOS appears exactly when evaluation's encoding has one), which keeps the prompt's tokens a
prefix of the full text's tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from abba_cli.errors import UserError
from abba_cli.prompts import render_prompt
from abba_cli.recipes import Example

IGNORE_INDEX = -100


def _encoder(tokenizer):
    """Batch encoder that never lets a tokenizer-appended EOS end the prompt (some add one by default)."""
    probe = tokenizer("a")["input_ids"]
    eos = tokenizer.eos_token_id
    strip_eos = (
        bool(probe)
        and eos is not None
        and probe[-1] == eos
        and eos not in tokenizer("a", add_special_tokens=False)["input_ids"]
    )

    def encode(texts: list[str], plain: bool = False) -> list[list[int]]:
        if plain:  # no special tokens at all: a continuation
            return tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = tokenizer(texts)["input_ids"]
        return [x[:-1] if strip_eos and x and x[-1] == eos else x for x in ids]

    return encode


def _tokenize_batch(
    batch: dict[str, list], encode, eos_id: int, max_seq_len: int, train_on_inputs: bool
) -> dict:
    prompts = [render_prompt(i, x) for i, x in zip(batch["instruction"], batch["input"], strict=True)]
    prompt_ids = encode(prompts)
    full_ids = encode([p + o for p, o in zip(prompts, batch["output"], strict=True)])
    out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_len": [], "split_boundary": []}
    for p, f, o in zip(prompt_ids, full_ids, batch["output"], strict=True):
        split = f[: len(p)] != p
        if split:
            # A token straddles the prompt/response boundary: keep the prompt's own tokens (what evaluation
            # feeds the model) and encode the response on its own after them.
            f = p + encode([o], plain=True)[0]
        ids = (f + [eos_id])[:max_seq_len]
        n_prompt = len(p)
        labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * min(n_prompt, len(ids)) + ids[n_prompt:]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["prompt_len"].append(n_prompt)
        out["split_boundary"].append(split)
    return out


def build_train_dataset(
    examples: Sequence[Example],
    tokenizer,
    max_seq_len: int,
    train_on_inputs: bool = False,
    drop_long_prompts: bool = False,
):
    """A `datasets.Dataset` with `input_ids` and `labels` (prompt tokens -100 unless train_on_inputs).

    Each sequence is prompt + output + EOS, cut to max_seq_len. An example whose prompt alone fills
    max_seq_len leaves no token to learn from: a UserError, or dropped with a warning if drop_long_prompts.
    """
    from datasets import Dataset

    if not examples:
        raise UserError("no training examples: the recipe produced an empty dataset")
    missing = [e.id for e in examples if e.output is None]
    if missing:
        raise UserError(
            f"{len(missing)} examples have no output to train on (first: {missing[0]}); "
            "use a train recipe or one whose render.output is set"
        )
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise UserError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
    encode = _encoder(tokenizer)
    ds = Dataset.from_dict(
        {
            "id": [e.id for e in examples],
            "instruction": [e.instruction for e in examples],
            "input": [e.input for e in examples],
            "output": [e.output for e in examples],
        }
    )
    ds = ds.map(
        _tokenize_batch,
        batched=True,
        remove_columns=["instruction", "input", "output"],
        fn_kwargs=dict(
            encode=encode, eos_id=eos_id, max_seq_len=max_seq_len, train_on_inputs=train_on_inputs
        ),
        desc="Tokenizing",
    )
    too_long = [i for i, n in enumerate(ds["prompt_len"]) if n >= max_seq_len]
    if too_long:
        first = too_long[0]
        if not drop_long_prompts:
            raise UserError(
                f"example {ds[first]['id']}: its prompt is {ds[first]['prompt_len']} tokens, which reaches "
                f"data.max_seq_len {max_seq_len} and leaves no response token to train on "
                f"({len(too_long)} such examples); raise data.max_seq_len (e.g. --set data.max_seq_len="
                f"{_next_pow2(max(ds['prompt_len']) + 1)})"
            )
        print(
            f"warning: dropped {len(too_long)} of {len(ds)} examples whose prompt reaches max_seq_len {max_seq_len}",
            file=sys.stderr,
        )
        keep = set(range(len(ds))) - set(too_long)
        ds = ds.select(sorted(keep))
        if len(ds) == 0:
            raise UserError(
                f"every example's prompt reaches max_seq_len {max_seq_len}; raise data.max_seq_len"
            )
    n_split = sum(ds["split_boundary"])
    if n_split:
        print(
            f"note: {n_split} examples had a token across the prompt/response boundary; "
            "their response was encoded on its own after the prompt's tokens",
            file=sys.stderr,
        )
    return ds.remove_columns(["prompt_len", "split_boundary"])


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


class DataCollator:
    """Right-pads a list of {input_ids, labels} to the longest in the batch (labels with -100)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict:
        import torch

        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def make_collator(tokenizer, pad_to_multiple_of: int | None = None) -> DataCollator:
    """Collator padding with the tokenizer's pad token (its EOS if it has none; masked out either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UserError("the tokenizer has neither a pad nor an EOS token")
    return DataCollator(pad, pad_to_multiple_of)
