"""Training data: render, tokenise, mask the prompt, fit max_seq_len.

The prompt is `render_prompt(instruction, input)`, the same string evaluation feeds the model, and the
target is `output` + EOS. Prompt and full text are encoded the same way (the tokenizer's own special-token
handling, so a BOS appears exactly when evaluation's encoding has one), which keeps the prompt's tokens a
prefix of the full text's tokens. Labels are IGNORE_INDEX wherever no loss is taken.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

from abba_cli.data.formats import ChatExample, TextExample, TokenizedExample
from abba_cli.data.prompts import render_chat, render_prompt
from abba_cli.data.recipes import Example
from abba_cli.errors import UserError

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


def build_train_dataset(
    examples: Sequence[Example | ChatExample | TextExample | TokenizedExample],
    tokenizer,
    max_seq_len: int,
    train_on_inputs: bool = False,
    drop_long: bool = False,
    chat_template: str | None = None,
):
    """A `datasets.Dataset` with `id`, `input_ids`, `labels` (-100: no loss) and `length`.

    instruction examples: Alpaca prompt + output + EOS, loss on the output and EOS; chat: the conversation as
    the chat template renders it, loss on the assistant turns; text: text + EOS, loss on all; tokenized: as
    given. Longer than max_seq_len: cut, or dropped with a count when drop_long.
    """
    from datasets import Dataset

    if not examples:
        raise UserError("no training examples: the recipe produced an empty dataset")
    kinds = {type(e) for e in examples}
    if len(kinds) != 1:
        raise UserError(f"one dataset holds examples of several formats: {sorted(k.__name__ for k in kinds)}")
    kind = kinds.pop()
    eos_id = tokenizer.eos_token_id
    if eos_id is None and kind in (Example, TextExample):
        raise UserError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
    ids = [e.id for e in examples]
    if kind is TokenizedExample:
        ds = Dataset.from_dict(
            {
                "id": ids,
                "input_ids": [list(e.input_ids) for e in examples],
                "labels": [list(e.labels if e.labels is not None else e.input_ids) for e in examples],
            }
        )
        _check_vocab(ds, tokenizer)
        return _fit_max_seq_len(ds, max_seq_len, drop_long)
    if kind is Example:
        missing = [e.id for e in examples if e.output is None]
        if missing:
            raise UserError(
                f"{len(missing)} examples have no output to train on (first: {missing[0]}); "
                "use a train recipe or one whose render.output is set"
            )
        columns = {
            "instruction": [e.instruction for e in examples],
            "input": [e.input for e in examples],
            "output": [e.output for e in examples],
        }
        fn = _tokenize_instructions
    elif kind is ChatExample:
        if chat_template is None:
            raise UserError("chat examples need a chat template (prompts.resolve_chat_template)")
        columns = {"messages": [list(e.messages) for e in examples]}
        fn = _tokenize_chats
    else:
        columns = {"text": [e.text for e in examples]}
        fn = _tokenize_texts
    ds = Dataset.from_dict({"id": ids, **columns})
    ds = ds.map(
        fn,
        batched=True,
        remove_columns=list(columns),
        fn_kwargs=dict(
            encode=_encoder(tokenizer),
            eos_id=eos_id,
            train_on_inputs=train_on_inputs,
            tokenizer=tokenizer,
            template=chat_template,
        ),
        desc="Tokenizing",
    )
    if "split_boundary" in ds.column_names:
        n_split = sum(ds["split_boundary"])
        if n_split:
            print(
                f"note: {n_split} examples had a token across the prompt/response boundary; "
                "their response was encoded on its own after the prompt's tokens",
                file=sys.stderr,
            )
        ds = ds.remove_columns(["split_boundary"])
    return _fit_max_seq_len(ds, max_seq_len, drop_long)


def _check_vocab(ds, tokenizer) -> None:
    vocab = len(tokenizer)
    for row in ds:
        bad = [t for t in row["input_ids"] if t >= vocab]
        if bad:
            raise UserError(
                f"example {row['id']}: input_ids holds {bad[0]}, beyond the tokenizer's {vocab} tokens "
                "(pre-tokenized with another tokenizer?)"
            )


def _tokenize_instructions(
    batch: dict[str, list], encode, eos_id: int, train_on_inputs: bool, **_: Any
) -> dict[str, list]:
    prompts = [render_prompt(i, x) for i, x in zip(batch["instruction"], batch["input"], strict=True)]
    prompt_ids = encode(prompts)
    full_ids = encode([p + o for p, o in zip(prompts, batch["output"], strict=True)])
    out: dict[str, list] = {"input_ids": [], "labels": [], "split_boundary": []}
    for p, f, o in zip(prompt_ids, full_ids, batch["output"], strict=True):
        split = f[: len(p)] != p
        if split:
            # A token straddles the prompt/response boundary: keep the prompt's own tokens (what evaluation
            # feeds the model) and encode the response on its own after them.
            f = p + encode([o], plain=True)[0]
        ids = f + [eos_id]
        out["input_ids"].append(ids)
        out["labels"].append(list(ids) if train_on_inputs else [IGNORE_INDEX] * len(p) + ids[len(p) :])
        out["split_boundary"].append(split)
    return out


def _tokenize_texts(batch: dict[str, list], encode, eos_id: int, **_: Any) -> dict[str, list]:
    ids = [x + [eos_id] for x in encode(batch["text"])]
    return {"input_ids": ids, "labels": [list(x) for x in ids]}


def _tokenize_chats(
    batch: dict[str, list], tokenizer, template: str, train_on_inputs: bool, **_: Any
) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": []}
    for row_id, messages in zip(batch["id"], batch["messages"], strict=True):
        ids, mask = chat_tokens(tokenizer, messages, template, row_id)
        out["input_ids"].append(ids)
        labels = (
            list(ids)
            if train_on_inputs
            else [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
        )
        out["labels"].append(labels)
    return out


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def chat_tokens(tokenizer, messages, template: str, row_id: str = "a row") -> tuple[list[int], list[int]]:
    """(token ids of the rendered conversation, 1 on the tokens of its assistant turns).

    The template decides everything, special tokens and end-of-turn markers included (nothing is added). A
    template marking assistant text with {% generation %} gives the mask directly; otherwise each assistant
    turn's characters are found by rendering the conversation up to it (with and without the turn) and the
    tokens overlapping those characters are marked, so a token merging across a turn boundary is still found.
    """
    messages = list(messages)
    if _GENERATION_TAG.search(template):
        enc = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        return list(enc["input_ids"]), list(enc["assistant_masks"])
    full = render_chat(tokenizer, messages, template)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], template, add_generation_prompt=True) if i else ""
        through = render_chat(tokenizer, messages[: i + 1], template)
        if not (through.startswith(before) and full.startswith(through)):
            raise UserError(
                f"example {row_id}: the chat template renders earlier turns differently once later turns "
                f"follow, so assistant turn {i} cannot be located; pass a template marking assistant text "
                "with {% generation %} (data.chat_template)"
            )
        spans.append((len(before), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(end > a and start < b for a, b in spans)) for start, end in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _fit_max_seq_len(ds, max_seq_len: int, drop_long: bool):
    """Cut (or, with drop_long, drop) what exceeds max_seq_len; an example left with no target is an error."""
    lengths = [len(x) for x in ds["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > max_seq_len]
    if drop_long and too_long:
        print(
            f"data.drop_long: dropped {len(too_long)} of {len(ds)} examples longer than data.max_seq_len "
            f"{max_seq_len} tokens (longest {max(lengths)})",
            file=sys.stderr,
        )
        ds = ds.select(sorted(set(range(len(ds))) - set(too_long)))
        if len(ds) == 0:
            raise UserError(f"every example is longer than data.max_seq_len {max_seq_len}; raise it")
    elif too_long:
        ds = ds.map(
            lambda b: {k: [x[:max_seq_len] for x in b[k]] for k in ("input_ids", "labels")},
            batched=True,
            desc="Truncating",
        )
    no_target = [i for i, labels in enumerate(ds["labels"]) if all(x == IGNORE_INDEX for x in labels[1:])]
    if no_target:
        first = ds[no_target[0]]["id"]
        raise UserError(
            f"example {first}: nothing left to train on within data.max_seq_len {max_seq_len} (its prompt "
            f"fills it; {len(no_target)} such examples); raise data.max_seq_len (e.g. --set "
            f"data.max_seq_len={_next_pow2(max(lengths))}) or drop them with --set data.drop_long=true"
        )
    return ds.add_column("length", [len(x) for x in ds["input_ids"]])


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p
