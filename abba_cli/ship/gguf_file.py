"""A merged Hugging Face folder written as one GGUF file for llama.cpp and Ollama, with the `gguf` library.

Follows llama.cpp's convert_hf_to_gguf.py conventions for the Llama family: tensor names from gguf's own
TensorNameMap; Q and K rows of `llama` models reordered for llama.cpp's rotary layout (its `permute`: HF keeps
each head's two rotary halves apart, llama.cpp interleaves them); 1-D tensors (norms, biases) kept in F32;
the tokenizer as its `gpt2` (byte-level BPE) or `llama` (SentencePiece) vocabulary (gguf_vocab.py). Written by
hand because the converter is a script in llama.cpp's repository, not part of the `gguf` package.

Mistral is written as `llama`, as llama.cpp's converter does: its architecture has no sliding window, so
llama.cpp attends over the whole context where Mistral's config limits attention to `sliding_window` tokens.
The two agree on any sequence up to that length (4096 for Mistral 7B), which the export says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from abba_cli.errors import UserError

GGUF_DTYPES = ("f16", "bf16", "q8_0")
# Hugging Face architecture -> GGUF architecture. Mistral is `llama` in llama.cpp.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_Q8_0_BLOCK = 32  # values per Q8_0 block; a row whose length is not a multiple stays F16, as llama.cpp does


def gguf_architecture(config: Any, source: str) -> str:
    """The GGUF architecture of a transformers config; UserError (one line) for anything else or for rotary
    scaling this writer does not carry."""
    archs = list(getattr(config, "architectures", None) or [])
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise UserError(
            f"--format gguf: {source} is {', '.join(archs) or config.model_type}; GGUF export supports the Llama "
            f"family: {', '.join(ARCHITECTURES)}"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if arch == "qwen2" and head_dim * config.num_attention_heads != config.hidden_size:
        # llama.cpp's qwen2 loader sizes the Q and output projections hidden_size wide
        raise UserError(
            f"--format gguf: {source} has {config.num_attention_heads} heads of {head_dim}, not hidden_size "
            f"{config.hidden_size} wide, which llama.cpp's qwen2 architecture cannot load"
        )
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise UserError(
            f"--format gguf: {source} uses {rope['rope_type']!r} rotary scaling, which this writer does not carry; "
            "merge with `abba merge` and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    return arch


def _rope_parameters(config: Any) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:  # older configs
        rope = {**rope, "rope_theta": config.rope_theta}
    return rope


def write_gguf(merged_dir: Path, tokenizer_dir: Path, out: Path, dtype: str, name: str) -> dict[str, Any]:
    """Write the merged model in `merged_dir` and the tokenizer in `tokenizer_dir` (its chat template included) to
    `out`; returns what was written (architecture, tensor counts per type, tokenizer model/pre-tokenizer)."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    from abba_cli.ship.gguf_vocab import add_vocabulary

    config = AutoConfig.from_pretrained(merged_dir)
    arch = gguf_architecture(config, str(merged_dir))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    writer = gguf.GGUFWriter(out, arch, use_temp_file=True)
    writer.add_name(name)
    _add_hparams(writer, gguf, config, arch, dtype)
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings:
        print(
            f"note: {config.architectures[0]} attends within a sliding window of {window} tokens; llama.cpp runs "
            f"it as `llama`, with full attention: the two agree on sequences up to {window} tokens"
        )
    vocabulary = add_vocabulary(writer, tokenizer, tokenizer_dir, config.vocab_size)
    counts = _add_tensors(writer, gguf, merged_dir, config, arch, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    return {"architecture": arch, "tensors": counts, "tokenizer": vocabulary}


def _add_hparams(writer: Any, gguf: Any, config: Any, arch: str, dtype: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = _rope_parameters(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    file_type = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[dtype]
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def permute_for_llama_cpp(weight: Any, n_head: int) -> Any:
    """Rows of a Q or K projection reordered from HF's rotary layout (each head's first halves, then its second
    halves) to llama.cpp's interleaved pairs: (heads, 2, d/2, n) -> (heads, d/2, 2, n)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _add_tensors(
    writer: Any, gguf: Any, merged_dir: Path, config: Any, arch: str, dtype: str
) -> dict[str, int]:
    import numpy as np
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    counts: dict[str, int] = {}
    for shard in sorted(merged_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                target = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise RuntimeError(f"{shard.name}: no GGUF name for tensor {key!r}")
                data = f.get_tensor(key).float().numpy()
                if arch == "llama" and key.endswith("self_attn.q_proj.weight"):
                    data = permute_for_llama_cpp(data, heads)
                elif arch == "llama" and key.endswith("self_attn.k_proj.weight"):
                    data = permute_for_llama_cpp(data, kv_heads)
                kind = tensor_type(data, dtype)
                if kind == "F32":
                    writer.add_tensor(target, data.astype(np.float32))
                elif kind == "F16":
                    writer.add_tensor(target, data.astype(np.float16))
                else:
                    qtype = getattr(gguf.GGMLQuantizationType, kind)
                    writer.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
                counts[kind] = counts.get(kind, 0) + 1
    return counts


def tensor_type(data: Any, dtype: str) -> str:
    """F32 for 1-D tensors (norms, biases: llama.cpp computes them in F32), else the requested type."""
    if data.ndim < 2:
        return "F32"
    if dtype == "q8_0":
        return "Q8_0" if data.shape[-1] % _Q8_0_BLOCK == 0 else "F16"
    return {"f16": "F16", "bf16": "BF16"}[dtype]


def round_like_gguf(data: Any, dtype: str) -> Any:
    """`data` (fp32 numpy) as the GGUF file stores it at `dtype`, read back as fp32 (gguf's own quantize and
    dequantize): the reference an exact writer must reproduce."""
    import gguf
    import numpy as np

    kind = tensor_type(data, dtype)
    if kind == "F32":
        return data
    if kind == "F16":
        return data.astype(np.float16).astype(np.float32)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    return gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype).astype(np.float32)
