"""Batches: right padding to the longest example of the batch, labels padded with IGNORE_INDEX."""

from __future__ import annotations

from typing import Any

from abba_cli.data.tokenize import IGNORE_INDEX
from abba_cli.errors import UserError


class DataCollator:
    """Right-pads a list of {input_ids, labels} to the longest in the batch (labels with IGNORE_INDEX)."""

    def __init__(
        self, pad_token_id: int, pad_to_multiple_of: int | None = None, max_length: int | None = None
    ):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length  # the multiple never pads past it (a longer row keeps its own length)

    def __call__(self, features: list[dict[str, Any]]) -> dict:
        import torch

        longest = length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
            if self.max_length is not None:
                length = max(longest, min(length, self.max_length))
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def make_collator(
    tokenizer, pad_to_multiple_of: int | None = None, max_length: int | None = None
) -> DataCollator:
    """Collator padding with the tokenizer's pad token (its EOS if it has none; masked out either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UserError("the tokenizer has neither a pad nor an EOS token")
    return DataCollator(pad, pad_to_multiple_of, max_length)


def to_device(batch: dict, device: Any) -> dict:
    """A collated batch on `device` (non-tensor entries kept as they are)."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def batch_tokens(batch: dict) -> int:
    """The tokens a collated batch holds, padding excluded (packed batches count them when built)."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    return int(batch["attention_mask"].sum())
