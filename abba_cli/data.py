"""Training data: render, tokenise, mask the prompt, collate with dynamic padding.

The prompt is `render_prompt(instruction, input)`, the same string evaluation feeds the model, and the
target is `output` + EOS. Prompt and full text are encoded the same way (the tokenizer's own special-token
handling, so a BOS appears exactly when evaluation's encoding has one), which keeps the prompt's tokens a
prefix of the full text's tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from abba_cli.config import DataConfig
from abba_cli.errors import UserError
from abba_cli.formats import ChatExample, TextExample, TokenizedExample
from abba_cli.fsutil import atomic_directory
from abba_cli.prompts import render_chat, render_prompt, resolve_chat_template
from abba_cli.recipes import Example, Recipe, load_examples, load_recipe, load_split
from abba_cli.runs import abba_home

IGNORE_INDEX = -100
# Bump when the tokenized layout changes, so old cache entries are never read as new ones.
CACHE_VERSION = 1


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


# ------------------------------------------------------------------------------------------ entry points


def load_train_examples(d: DataConfig) -> tuple[Recipe, list, list]:
    """(recipe, training examples, validation examples) for data config `d`, every row checked (no tokenizer,
    no model). Validation: data.val_samples held out of the source (recipes.load_split), or data.val_path."""
    recipe = load_recipe(d.recipe)
    if d.chat_template is not None and recipe.format != "chat":
        raise UserError(f"data.chat_template applies to data.recipe chat, not to {d.recipe!r}")
    examples, held_out = load_split(
        recipe, d.path, d.num_samples, d.skip_samples, d.seed, held_out=d.val_samples or 0
    )
    if d.val_path is not None:
        held_out = load_examples(recipe, path=d.val_path)
    return recipe, examples, held_out


def run_chat_template(d: DataConfig, tokenizer, model_name: str = "the model") -> str | None:
    """The chat template a run trained with (None: it trained on the Alpaca prompt); evaluation renders
    through the same one (`prompts.prompt_renderer`)."""
    if load_recipe(d.recipe).format != "chat":
        return None
    return resolve_chat_template(tokenizer, d.chat_template, model_name)


def check_examples(d: DataConfig, examples: Sequence, tokenizer, model_name: str) -> str:
    """`abba validate`'s data line: the rows were checked on loading; a chat run's template is resolved and
    tried on the first conversation. Full tokenisation (and the max_seq_len checks) stays with training."""
    template = run_chat_template(d, tokenizer, model_name)
    if template is not None:
        ids, mask = chat_tokens(tokenizer, examples[0].messages, template, examples[0].id)
        if not any(mask):
            raise UserError(
                f"example {examples[0].id}: the chat template left no assistant token to train on"
            )
    kind = "conversations" if template is not None else "examples"
    return f"# data: {len(examples)} {kind} from data.recipe {d.recipe}" + (f" ({d.path})" if d.path else "")


def run_dir_chat_template(run_dir: Path, tokenizer, model_name: str = "the model") -> str | None:
    """The chat template of a run directory's training (None: Alpaca prompts, or no readable config.yaml)."""
    from abba_cli.config import load_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        cfg = load_config(path)
    except UserError:
        return None
    return run_chat_template(cfg.data, tokenizer, model_name)


def prepare_train_dataset(d: DataConfig, tokenizer, model_name: str, main_process_first=None):
    """(training set, validation set or None), tokenized: from the on-disk cache when built before.

    `main_process_first` (accelerate's context manager) lets the main process build and save the cache while
    the others wait, then read it.
    """
    recipe, examples, held_out = load_train_examples(d)
    template = (
        resolve_chat_template(tokenizer, d.chat_template, model_name) if recipe.format == "chat" else None
    )
    if d.chat_template is not None:
        # The run's tokenizer carries the template it trained with (a full fine-tune saves this tokenizer).
        tokenizer.chat_template = template

    def build(part: list):
        return lambda: build_train_dataset(
            part, tokenizer, d.max_seq_len, d.train_on_inputs, d.drop_long, template
        )

    datasets = []
    for part in (examples, held_out):
        if not part:
            datasets.append(None)
        elif not d.cache:
            datasets.append(build(part)())
        else:
            path = cache_dir() / cache_key(part, tokenizer, template, d)
            with main_process_first() if main_process_first is not None else nullcontext():
                datasets.append(_cached(path, build(part)))
    if datasets[0] is None:
        raise UserError(
            f"data.recipe {d.recipe!r}: no training examples (check data.num_samples/skip_samples)"
        )
    return datasets[0], datasets[1]


def cache_dir() -> Path:
    return abba_home() / "cache" / "datasets"


def cache_key(examples: Sequence, tokenizer, template: str | None, d: DataConfig) -> str:
    """Hash of everything the tokenized dataset depends on: the examples' content (source rows, recipe
    rendering, sample selection), the tokenizer (its full serialisation), the chat template and the settings."""
    h = hashlib.sha256(f"abba-data-v{CACHE_VERSION}".encode())
    for e in examples:
        h.update(json.dumps([type(e).__name__, dataclasses.asdict(e)], sort_keys=True).encode())
        h.update(b"\n")
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    settings = [template, d.max_seq_len, d.train_on_inputs, d.drop_long]
    h.update(json.dumps(settings).encode())
    return h.hexdigest()[:32]


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        [type(tokenizer).__name__, tokenizer.special_tokens_map, tokenizer.eos_token_id], default=str
    )
    return hashlib.sha256((body + extra).encode()).hexdigest()


def _cached(path: Path, build):
    from datasets import load_from_disk

    if path.is_dir():
        try:
            ds = load_from_disk(str(path))
            print(f"tokenized data: reusing the cache {path} ({len(ds)} examples)", file=sys.stderr)
            return ds
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is rebuilt, never fatal
            print(
                f"tokenized data: cache {path} unreadable ({type(e).__name__}); rebuilding", file=sys.stderr
            )
    ds = build()
    try:
        if not path.is_dir():
            with atomic_directory(path, overwrite=True) as tmp:
                ds.save_to_disk(str(tmp))
        print(f"tokenized data: cached in {path} (--set data.cache=false to skip)", file=sys.stderr)
        return load_from_disk(str(path))
    except OSError as e:
        print(
            f"warning: cannot write the data cache {path} ({e.strerror or e}); continuing without",
            file=sys.stderr,
        )
        return ds


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


def describe_dataset(ds) -> str:
    """One line for `abba validate` and `abba train`: examples, tokens, targets, longest."""
    lengths = ds["length"]
    targets = sum(sum(x != IGNORE_INDEX for x in labels[1:]) for labels in ds["labels"])
    return (
        f"{len(ds)} training examples, {sum(lengths)} tokens ({targets} with loss), "
        f"longest {max(lengths)}, mean {sum(lengths) / len(lengths):.1f}"
    )


def length_grouped_order(lengths: Sequence[int], seed: int, epoch: int, batch_size: int) -> list[int]:
    """An epoch order whose consecutive `batch_size` chunks hold examples of similar length (less padding).

    As transformers' LengthGroupedSampler does: a seeded permutation cut into mega-batches of 50 batches, each
    sorted by length, so batches stay random in what they hold; then the batches' order is shuffled by the
    same generator. A function of (lengths, seed, epoch) only: the same on every process and on resume.
    """
    import torch

    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    mega = 50 * batch_size
    order: list[int] = []
    for start in range(0, len(perm), mega):
        order.extend(sorted(perm[start : start + mega], key=lambda i: -lengths[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    # A short last batch stays last: with several processes the stream wraps the order to fill it.
    full = len(batches) - (len(batches[-1]) < batch_size) if batches else 0
    shuffled = torch.randperm(full, generator=gen).tolist()
    return [i for b in shuffled for i in batches[b]] + [i for b in batches[full:] for i in b]


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
