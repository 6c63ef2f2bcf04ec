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


def micro_batch_loss(model: Any, batch: dict, impl: str, loss_fn: Any = target_loss_sum) -> Any:
    """The summed loss of one collated micro-batch over its target tokens: `full` scores the model's logits
    with `loss_fn(logits, labels)`; `chunked` projects its final hidden states chunk by chunk; `cce` and
    `liger` hand them to that library's fused kernel."""
    if impl == "full":
        return loss_fn(model(**model_inputs(batch)).logits, batch["labels"])
    from accelerate.utils import extract_model_from_parallel

    unwrapped = extract_model_from_parallel(model)
    head = unwrapped.get_output_embeddings()
    hidden = final_hidden_states(model, batch)
    if impl == "chunked":
        from abba_cli.train.linear_cross_entropy import chunked_cross_entropy_sum

        return chunked_cross_entropy_sum(hidden, batch["labels"], head, logit_softcap(unwrapped))
    from abba_cli.train.fused_cross_entropy import fused_cross_entropy_sum

    return fused_cross_entropy_sum(hidden, batch["labels"], head, impl)


def model_inputs(batch: dict) -> dict:
    """What the model reads of a collated batch: padded batches carry an attention mask, packed ones position
    ids (from which the attention backend isolates the examples of a row)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "position_ids" in inputs:  # with a cache, transformers stops reading example boundaries from them
        inputs["use_cache"] = False
    return inputs


def final_hidden_states(model: Any, batch: dict) -> Any:
    """The decoder's final (normed) hidden states (B, T, H) of a batch, the model run through its own forward
    (so every engine's hooks gather and free weights as usual) with logits taken for the last position only."""
    from accelerate.utils import extract_model_from_parallel

    decoder = extract_model_from_parallel(model).get_decoder()
    captured: list = []

    def keep_output(module: Any, args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(output[0] if hidden is None else hidden)

    handle = decoder.register_forward_hook(keep_output)
    try:
        model(**model_inputs(batch), logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


def logit_softcap(model: Any) -> float | None:
    """The cap of a model that soft-caps its final logits (Gemma-2's config.final_logit_softcapping), else None."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def chunked_loss_unsupported(model: Any, impl: str = "chunked") -> str | None:
    """Why `impl` cannot reproduce this model's logits (None: it can): the chunked loss projects the decoder's
    final hidden states with the output embedding's weight and applies a final soft-cap as the model does;
    the fused kernels (cce, liger) are handed the projection alone."""
    import inspect

    import torch

    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the output layer is a {type(head).__name__}, not a plain Linear"
    if head.bias is not None:
        return "the output layer has a bias"
    from abba_cli.train.fused_cross_entropy import FUSED_IMPLS

    transforms = ("logit_scale", "logits_scaling")
    if impl in FUSED_IMPLS:
        transforms = ("final_logit_softcapping", *transforms)
    for name in transforms:
        if getattr(model.config, name, None) not in (None, 1, 1.0):
            return f"{model.config.model_type} transforms its logits after the projection (config.{name})"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__}.forward takes no logits_to_keep"
    try:
        model.get_decoder()
    except (AttributeError, ValueError, NotImplementedError):
        return f"{type(model).__name__} has no decoder module to read final hidden states from"
    return None


def check_loss_impl(cfg: Any, device_type: str) -> None:
    """Refuse train.loss_impl cce / liger where its library, triton or CUDA is missing (before any model loads)."""
    from abba_cli.errors import UserError
    from abba_cli.train.fused_cross_entropy import FUSED_IMPLS, fused_loss_unavailable

    impl = cfg.train.loss_impl
    reason = fused_loss_unavailable(impl, device_type) if impl in FUSED_IMPLS else None
    if reason:
        raise UserError(f"train.loss_impl {impl}: {reason}; or use train.loss_impl chunked (the same loss)")


def resolve_loss_impl(cfg: Any, model: Any) -> str:
    """train.loss_impl -> full | chunked | cce | liger. `auto`: chunked when a micro-batch can hold more tokens
    than one chunk (its fp32 logits are then larger than a chunk's) and the model allows it. Decided once per
    run: under ZeRO-3/FSDP2 every process must make the same weight-gathering calls."""
    from abba_cli.errors import UserError
    from abba_cli.train.linear_cross_entropy import chunk_tokens

    impl = cfg.train.loss_impl
    if impl == "full":
        return "full"
    reason = chunked_loss_unsupported(model, impl)
    if impl != "auto":  # chunked, cce, liger: all project the final hidden states with the head's weight
        if reason:
            raise UserError(f"train.loss_impl {impl}: {reason}; use train.loss_impl full or auto")
        return impl
    tokens = cfg.train.micro_batch_size * cfg.data.max_seq_len
    return "chunked" if reason is None and tokens > chunk_tokens(model.config.vocab_size) else "full"


def describe_loss_impl(impl: str, model: Any, tokens: int) -> str:
    """One line for the plan: which loss runs and the fp32 logits it holds at once."""
    from abba_cli.train.fused_cross_entropy import FUSED_IMPLS
    from abba_cli.train.linear_cross_entropy import chunk_tokens

    vocab = model.config.vocab_size
    if impl in FUSED_IMPLS:
        return f"loss: {impl} fused linear cross-entropy (its own kernel; the whole logits never held)"
    held = min(tokens, chunk_tokens(vocab)) if impl == "chunked" else tokens
    return (
        f"loss: {impl} cross-entropy, fp32 logits of at most {held} x {vocab} "
        f"({held * vocab * 4 / 2**20:.0f} MiB) at once"
    )
