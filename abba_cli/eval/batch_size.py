"""The generation batch size `abba eval` uses when none is given: on CUDA as many rows as the KV cache of the
model fits in the GPU's memory (decoding is bound by reading the weights, so wider batches are nearly free);
on the CPU the fixed default (compute-bound: wider batches only pad more)."""

from __future__ import annotations

import torch

CPU_BATCH_SIZE = 8
MAX_CUDA_BATCH_SIZE = 256  # past this, a decode step stops being weight-bound on current GPUs
MEMORY_FRACTION = 0.9  # the allocator's fragmentation and the CUDA context
RESERVE_BYTES = 2 * 2**30  # logits, sampling buffers, the prefill's transient activations beyond the formula


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of key and value cache one token takes across all layers (every layer counted full length)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def row_bytes(config, dtype: torch.dtype, prompt_tokens: int, new_tokens: int) -> int:
    """Memory one row of a batch needs: its KV cache at full length plus the prefill's widest activation
    (the MLP's up and gate projections over the prompt) and its fp32 last-token logits."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = torch.empty((), dtype=dtype).element_size()
    kv = kv_bytes_per_token(config, dtype) * (prompt_tokens + new_tokens)
    prefill = 2 * prompt_tokens * text.intermediate_size * size
    return kv + prefill + 2 * text.vocab_size * 4


def cuda_batch_size(device_bytes: int, weight_bytes: int, row: int) -> int:
    """The largest power of two of rows whose memory fits beside the weights, capped at MAX_CUDA_BATCH_SIZE.

    A power of two so that the same GPU and model give the same batch size on every call: it is part of
    what --resume checks (bf16 outputs depend on the batch)."""
    free = device_bytes * MEMORY_FRACTION - weight_bytes - RESERVE_BYTES
    rows = max(1, int(free // max(row, 1)))
    return min(MAX_CUDA_BATCH_SIZE, 1 << (rows.bit_length() - 1))


def default_batch_size(model, device: torch.device, prompt_tokens: int, new_tokens: int) -> int:
    """The batch size for `model` on `device`, whose longest prompt has `prompt_tokens` tokens."""
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    total = torch.cuda.get_device_properties(device).total_memory
    row = row_bytes(model.config, model.dtype, prompt_tokens, new_tokens)
    return cuda_batch_size(total, weights, row)
