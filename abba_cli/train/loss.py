"""The training loss: next-token cross-entropy summed over target tokens (labels != IGNORE_INDEX)."""

from __future__ import annotations

from typing import Any

from abba_cli.data.tokenize import IGNORE_INDEX


def target_loss_sum(logits: Any, labels: Any) -> Any:
    """Sum of next-token cross-entropy over target positions (labels != IGNORE_INDEX), computed in fp32.

    The labels move, not the logits: position t's logits are scored against labels[t + 1], and the last position
    gets IGNORE_INDEX. logits[:, :-1] is not contiguous, so flattening it copied the whole (batch, seq, vocab) tensor, and
    its backward zero-filled and copied another (201 MB each for SmolLM2 at 4 x 256 tokens): fp32 loss forward +
    backward 383 -> 237 ms per micro-batch, the same gradients bit for bit (benchmarks/RESULTS.md "End to end").
    """
    import torch.nn.functional as F

    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(logits.device)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def count_targets(labels: Any) -> int:
    """The tokens a micro-batch's loss is taken on: every label after the first that is not IGNORE_INDEX (the
    first token has no preceding position to predict it). Counted on host tensors, so no device sync."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
