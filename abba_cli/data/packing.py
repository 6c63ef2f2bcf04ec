"""data.packing: tokenized examples packed into rows of up to data.max_seq_len tokens, and the batches of them.

Rows come from a seeded first-fit-decreasing bin packing (a function of the lengths, the row size and the seed
only: the same on every process and on --resume); the epoch order then shuffles rows as it shuffles examples
unpacked (data/order.py). In a batch, position ids restart at every example and each example's first label is
ignored, so no example predicts a token of another; attention is kept inside each example by the backend from
the position ids: transformers builds a block-diagonal causal mask for eager/SDPA/flex from them when no
attention mask is given, and FlashAttention runs varlen from them on a single flattened row (the backends
ISOLATING_BACKENDS lists).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from abba_cli.data.tokenize import IGNORE_INDEX
from abba_cli.errors import UserError

# Backends that keep examples packed in one row apart given restarting position ids (None: the default, sdpa).
# flash_attention_4 is left out until its varlen path is checked.
ISOLATING_BACKENDS = (None, "eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


def check_packing(cfg: Any) -> None:
    """Refuse data.packing where examples would not stay apart, or with data.group_by_length (rows are full)."""
    if not cfg.data.packing:
        return
    if cfg.data.group_by_length:
        raise UserError(
            "data.packing and data.group_by_length both cut padding, and packed rows are already full; "
            "set only one (data.group_by_length: false)"
        )
    attn = cfg.model.attn_implementation
    if attn not in ISOLATING_BACKENDS:
        raise UserError(
            f"data.packing with model.attn_implementation {attn!r}: that backend is not known to keep packed "
            f"examples apart; use one of {', '.join(ISOLATING_BACKENDS[1:])}, or data.packing: false"
        )


def flattens_rows(attn_implementation: str | None) -> bool:
    """FlashAttention reads example boundaries from position ids only on a batch of one row."""
    return attn_implementation is not None and attn_implementation.startswith("flash_attention")


def pack_rows(lengths: Sequence[int], max_len: int, seed: int) -> list[list[int]]:
    """Example indices per row: first-fit decreasing (longest first, each into the first row it fits), ties in a
    seeded shuffle's order. Every length must be <= max_len (data.max_seq_len cut or dropped them).

    First fit through a max-tree over the rows' free space: O(n log n) for n examples. Rows not yet opened
    have the whole max_len free, so the leftmost row an example fits in is an open one whenever one has room.
    """
    import torch

    n = len(lengths)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the shuffled order
    size = 1
    while size < max(n, 1):
        size *= 2
    free = [0] * size + [max_len] * n + [0] * (size - n)  # free[size + r]: room left in row r
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    rows: list[list[int]] = []
    for i in order:
        need, node = lengths[i], 1
        while node < size:  # descend to the leftmost row with room
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        free[node] -= need
        while node > 1:
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return rows


class PackedRows:
    """A tokenized dataset seen as packed rows: row i is the list of its examples (dicts, as the dataset's)."""

    def __init__(self, dataset: Any, max_len: int, seed: int):
        self.dataset = dataset
        self.max_len = max_len
        self.rows = pack_rows(list(dataset["length"]), max_len, seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[dict]:
        return [self.dataset[j] for j in self.rows[i]]

    def stats(self) -> PackingStats:
        lengths = self.dataset["length"]
        tokens = sum(lengths)
        return PackingStats(len(self.dataset), len(self.rows), tokens, len(self.rows) * self.max_len)


@dataclass(frozen=True)
class PackingStats:
    examples: int
    rows: int
    tokens: int
    slots: int  # rows x max_seq_len

    def __str__(self) -> str:
        return (
            f"packing: {self.examples} examples in {self.rows} rows of up to {self.slots // max(self.rows, 1)} "
            f"tokens, {self.examples / max(self.rows, 1):.2f} examples per row, "
            f"padding {1 - self.tokens / max(self.slots, 1):.1%}"
        )


class PackedCollator:
    """A batch of packed rows, each padded to max_len (a fixed shape): input_ids, labels (each example's first
    label ignored), position_ids restarting at every example, and no attention mask (the backend isolates the
    examples from the position ids). Flattened to one row of rows x max_len tokens for FlashAttention."""

    def __init__(self, pad_token_id: int, max_len: int, flatten: bool = False):
        self.pad_token_id, self.max_len, self.flatten = pad_token_id, max_len, flatten

    def __call__(self, rows: list[list[dict]]) -> dict:
        import torch

        shape = (len(rows), self.max_len)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        tokens = 0
        for r, examples in enumerate(rows):
            at = 0
            for f in examples:
                n = len(f["input_ids"])
                input_ids[r, at : at + n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
                labels[r, at + 1 : at + n] = torch.as_tensor(f["labels"][1:], dtype=torch.long)
                position_ids[r, at : at + n] = torch.arange(n)
                at += n
            # The padding after the last example is one more run of positions: a block of its own.
            position_ids[r, at:] = torch.arange(self.max_len - at)
            tokens += at
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.flatten:
            batch = {k: v.reshape(1, -1) for k, v in batch.items()}
        return {**batch, "num_tokens": tokens}


def make_packed_collator(tokenizer: Any, max_len: int, attn_implementation: str | None) -> PackedCollator:
    """The packed collator for a run: the tokenizer's pad token (its EOS if none; never a target)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UserError("the tokenizer has neither a pad nor an EOS token")
    return PackedCollator(pad, max_len, flattens_rows(attn_implementation))
