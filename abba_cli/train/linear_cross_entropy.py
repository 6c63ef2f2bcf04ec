"""Cross-entropy of the output projection taken over chunks of tokens: the fp32 logits of the whole micro-batch
(tokens x vocabulary, usually the largest activation of a causal LM) never exist, in forward or backward.

Forward scores one chunk of target rows at a time without keeping its logits; backward projects each chunk
again and takes its gradients by autograd on that chunk alone, with the same ops and dtypes as the whole-logits
loss (train/loss.py), so both give the same loss and gradients up to float round-off. Only rows that have a
target are projected at all (prompt and padding rows never need logits).

A model that soft-caps its logits after the projection (Gemma-2: cap * tanh(logits / cap)) has the cap applied
to each chunk's logits with the same ops, in the same dtype, as its own forward.

The head's weight is read whole once in forward and once in backward (`gathered_weight`): under DeepSpeed
ZeRO-3 and FSDP2 that is a collective, so every process makes the same two calls per micro-batch however many
chunks its own tokens need (gathering per chunk would hang processes with different chunk counts).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

# A chunk's fp32 logits hold at most this many elements (64 MiB): Llama-3's 128,256 words -> 130 tokens a
# chunk, SmolLM2's 49,152 -> 341. Large enough that each chunk's matmul keeps a GPU busy.
CHUNK_ELEMENTS = 2**24
MIN_CHUNK_TOKENS = 64


def chunk_tokens(vocab_size: int) -> int:
    """Tokens scored per chunk for a head of `vocab_size` outputs."""
    return max(MIN_CHUNK_TOKENS, CHUNK_ELEMENTS // max(vocab_size, 1))


@contextmanager
def gathered_weight(head: Any) -> Iterator[torch.Tensor]:
    """The head's whole weight, whatever shards it: DeepSpeed ZeRO-3 gathers its partitions for the block (and
    frees them after), an FSDP2 DTensor is all-gathered, a whole tensor is itself."""
    weight = head.weight
    if hasattr(weight, "ds_id"):  # a ZeRO-3 partitioned parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            yield weight
        return
    full_tensor = getattr(weight, "full_tensor", None)
    yield full_tensor() if full_tensor is not None else weight


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """One chunk's logits as the model's own forward makes them: the projection, then its soft-cap if it has one
    (transformers' Gemma-2 order: divide, tanh, multiply, in the projection's dtype)."""
    logits = F.linear(hidden, weight)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ W.T, targets) in chunks of rows; every row has a target.

    `weight` is the head's weight when it trains (its gradient is returned through this function, so an engine
    sees one gradient for it, tied embeddings included), else None (the frozen weight is read from `head`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, head, chunk, softcap):  # hidden (N, H), targets (N,)
        device_type = hidden.device.type
        ctx.autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        ctx.head, ctx.chunk, ctx.softcap = head, chunk, softcap
        ctx.save_for_backward(hidden, targets)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.no_grad(), gathered_weight(head) as w:
            for start in range(0, hidden.size(0), chunk):
                logits = chunk_logits(hidden[start : start + chunk], w, softcap)  # (chunk, V), autocast dtype
                total += F.cross_entropy(logits.float(), targets[start : start + chunk], reduction="sum")
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, targets = ctx.saved_tensors
        trains_weight = ctx.needs_input_grad[1]
        device_type, enabled, dtype = ctx.autocast
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            with gathered_weight(ctx.head) as whole:
                w = whole.detach().requires_grad_(trains_weight)
                for start in range(0, hidden.size(0), ctx.chunk):
                    h = hidden[start : start + ctx.chunk].detach().requires_grad_(grad_hidden is not None)
                    loss = F.cross_entropy(
                        chunk_logits(h, w, ctx.softcap).float(),
                        targets[start : start + ctx.chunk],
                        reduction="sum",
                    )
                    wrt = [t for t in (h, w) if t.requires_grad]
                    grads = dict(zip(map(id, wrt), torch.autograd.grad(loss, wrt, grad_total), strict=True))
                    if grad_hidden is not None:
                        grad_hidden[start : start + ctx.chunk] = grads[id(h)]
                    if trains_weight:
                        g = grads[id(w)]
                        grad_weight = g if grad_weight is None else grad_weight + g
        return grad_hidden, grad_weight, None, None, None, None


def target_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (N, H), targets (N,)) of a micro-batch's final hidden states (B, T, H) and labels (B, T): position t
    is scored against labels[t + 1], and only positions with a target are kept (the others never need logits)."""
    from abba_cli.data.tokenize import IGNORE_INDEX

    labels = labels.to(hidden.device)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    keep = targets != IGNORE_INDEX
    return hidden[keep], targets[keep]  # a copy of the target rows only


def chunked_cross_entropy_sum(
    hidden: torch.Tensor, labels: torch.Tensor, head: Any, softcap: float | None = None
) -> torch.Tensor:
    """The same sum as train/loss.py's `target_loss_sum` over a micro-batch's final hidden states (B, T, H) and
    labels (B, T), chunk by chunk; `softcap`: the model's final logit soft-cap (None: none)."""
    rows, targets = target_rows(hidden, labels)
    weight = head.weight if head.weight.requires_grad else None
    chunk = chunk_tokens(head.out_features)
    return ChunkedLinearCrossEntropy.apply(rows, weight, targets, head, chunk, softcap)
