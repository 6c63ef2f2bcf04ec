"""The logit self-check merge, export --rank and truncation share: fixed prompts, their logits computed in fp32
whatever the weights' dtype, and how far two sets of logits are apart."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CHECK_PROMPTS = (
    "Below is an instruction that describes a task. Write a response that completes the request.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "The answer is: 42",
)


@contextlib.contextmanager
def fp32_compute(model) -> Iterator[None]:
    """Run forward passes in fp32 while the weights stay stored in their own dtype.

    Each module's own parameters are upcast just for its forward and put back afterwards (exactly: the values
    came from that dtype), so the extra memory is one module's weights in fp32, not an fp32 copy of the model.
    The self-check needs this: in bf16 the forward pass's own rounding (a few % of the logits over 30 layers
    of SmolLM2) would hide whether the merge is right; in fp32 what remains is the rounding of W0 + dW.
    """
    import torch

    def upcast(module, args):
        for p in module.parameters(recurse=False):
            # Packed bitsandbytes weights (uint8/int8) compute in their own dtype; they are never upcast.
            if p.dtype != torch.float32 and p.is_floating_point():
                module._abba_dtypes = getattr(module, "_abba_dtypes", {})
                module._abba_dtypes[id(p)] = p.dtype
                p.data = p.data.float()

    def restore(module, args, output):
        saved = getattr(module, "_abba_dtypes", None)
        if saved:
            for p in module.parameters(recurse=False):
                if id(p) in saved:
                    p.data = p.data.to(saved[id(p)])
            del module._abba_dtypes

    handles = []
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(upcast))
            handles.append(module.register_forward_hook(restore))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module in model.modules():  # an exception mid-forward may leave a module upcast
            restore(module, None, None)


def prompt_logits(model, tokenizer, prompts: tuple[str, ...]) -> list[torch.Tensor]:
    """Per-prompt fp32 logits (tokens, vocab), computed in fp32 in one right-padded batch.

    One batch, because each forward under fp32_compute pays for casting every weight; right padding, so the
    real tokens' logits do not depend on the pad tokens (causal attention, positions from 0).
    """
    import torch

    device = next(model.parameters()).device
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="right").to(device)
    with torch.inference_mode(), fp32_compute(model):
        logits = model(**batch).logits.float().cpu()  # (prompts, tokens, vocab)
    mask = batch["attention_mask"].bool().cpu()
    return [logits[i][mask[i]] for i in range(len(prompts))]


def compare_logits(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
    """Max abs diff, that diff relative to the reference logits' scale (max |logit|), top-1 agreement."""
    import torch

    max_abs = max(float((a - b).abs().max()) for a, b in zip(ref, got, strict=True))
    scale = max(float(a.abs().max()) for a in ref)
    agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(ref, got, strict=True)])
    return {
        "max_abs_diff": max_abs,
        "max_rel_diff": max_abs / max(scale, 1e-12),
        "logit_scale": scale,
        "top1_agreement": float(agree.mean()),
    }
