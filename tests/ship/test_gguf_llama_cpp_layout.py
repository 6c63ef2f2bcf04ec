"""The GGUF file holds what llama.cpp's loader requires of each architecture we export, checked with gguf's own
reader: llama.cpp itself is not installed here (llama-cpp-python builds from source), and transformers' GGUF
loader, the export's read-back check, is more forgiving (it defaults missing keys and ignores unknown tensors).

The requirements are llama.cpp's, read from src/llama-model.cpp (ggml-org/llama.cpp at 00342301d01a):
`llama_model::load_hparams` (the keys, which are required, what the optional ones default to) and
`llama_model::load_tensors` (`case LLM_ARCH_LLAMA` and `case LLM_ARCH_QWEN2`: each tensor's name and shape in
ggml's order, innermost dimension first, required or TENSOR_NOT_REQUIRED); and from src/llama-vocab.cpp (the
token list sizes the vocabulary, which must match token_embd; a `gpt2` vocabulary needs merges). The model
loader fails on a tensor of the wrong shape, on a required tensor or key that is missing, and on any tensor in
the file that load_tensors did not ask for ("wrong number of tensors").
"""

from __future__ import annotations

from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")

from conftest import TINY_DECODER, build_tiny_llama, build_tiny_tokenizer  # noqa: E402
from transformers import LlamaConfig, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from abba_cli.ship.gguf_file import write_gguf  # noqa: E402

# Every `{arch}.*` key load_hparams reads for LLM_ARCH_LLAMA / LLM_ARCH_QWEN2 (required or optional); a key we
# write outside this set would be one llama.cpp never reads: a misspelling, or a setting silently lost.
LLAMA_CPP_READS = {
    "context_length",
    "embedding_length",
    "block_count",
    "expert_count",
    "expert_used_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.layer_norm_rms_epsilon",
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scaling.finetuned",
    "rope.scaling.original_context_length",
    "rope.scaling.attn_factor",
    "vocab_size",
}
# Read with required=true by load_hparams (the first three for every architecture, the epsilon in both cases);
# feed_forward_length and head_count are read as optional but default to 0, which no transformer runs with.
LLAMA_CPP_REQUIRES = {
    "context_length",
    "embedding_length",
    "block_count",
    "attention.layer_norm_rms_epsilon",
    "feed_forward_length",
    "attention.head_count",
}


def llama_cpp_tensors(arch: str, hp: dict[str, int]) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(required, optional) tensor name -> shape (ggml order) that load_tensors creates for `arch`."""
    n_embd, n_vocab, n_ff = hp["n_embd"], hp["n_vocab"], hp["n_ff"]
    k_gqa, v_gqa = hp["head_k"] * hp["n_head_kv"], hp["head_v"] * hp["n_head_kv"]
    # LLAMA sizes Q and the attention output by head_k * n_head; QWEN2 assumes they are n_embd wide
    q_width = hp["head_k"] * hp["n_head"] if arch == "llama" else n_embd
    required = {"token_embd.weight": (n_embd, n_vocab), "output_norm.weight": (n_embd,)}
    optional = {"output.weight": (n_embd, n_vocab)}  # absent: token_embd is reused (tied embeddings)
    if arch == "qwen2":
        optional["output.bias"] = (n_vocab,)
    for i in range(hp["n_layer"]):
        b = f"blk.{i}."
        required |= {
            b + "attn_norm.weight": (n_embd,),
            b + "attn_q.weight": (n_embd, q_width),
            b + "attn_k.weight": (n_embd, k_gqa),
            b + "attn_v.weight": (n_embd, v_gqa),
            b + "attn_output.weight": (q_width, n_embd),
            b + "ffn_norm.weight": (n_embd,),
            b + "ffn_gate.weight": (n_embd, n_ff),
            b + "ffn_down.weight": (n_ff, n_embd),
            b + "ffn_up.weight": (n_embd, n_ff),
        }
        biases = {
            b + "attn_q.bias": (n_embd,),
            b + "attn_k.bias": (v_gqa,),  # llama.cpp sizes both by n_embd_gqa (the V width)
            b + "attn_v.bias": (v_gqa,),
        }
        if arch == "qwen2":
            required |= biases  # created with flags 0: required
        else:
            optional |= biases | {
                b + "attn_output.bias": (n_embd,),
                b + "rope_freqs.weight": (hp["n_rot"] // 2,),
                b + "ffn_gate.bias": (n_ff,),
                b + "ffn_down.bias": (n_embd,),
                b + "ffn_up.bias": (n_ff,),
            }
    return required, optional


def _hparams(reader, arch: str) -> dict[str, int]:
    """What load_hparams derives from the file, with its defaults for the optional keys."""
    field = reader.fields

    def key(name, default=None):
        f = field.get(f"{arch}.{name}")
        return default if f is None else f.contents()

    n_embd, n_head = key("embedding_length"), key("attention.head_count")
    head_k = key("attention.key_length", n_embd // n_head)
    return {
        "n_embd": n_embd,
        "n_layer": key("block_count"),
        "n_ff": key("feed_forward_length", 0),
        "n_head": n_head,
        "n_head_kv": key("attention.head_count_kv", n_head),
        "head_k": head_k,
        "head_v": key("attention.value_length", n_embd // n_head),
        "n_rot": key("rope.dimension_count", head_k),
        "n_vocab": len(field["tokenizer.ggml.tokens"].contents()),  # llama-vocab.cpp: the token list
    }


def _write(tmp_path: Path, model, name: str) -> Path:
    folder = tmp_path / name
    model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / f"{name}.gguf"
    write_gguf(folder, folder, out, "f16", name)
    return out


def _qwen2(vocab_size: int):
    import torch

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        **TINY_DECODER,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
    )
    return Qwen2ForCausalLM(cfg)


@pytest.mark.parametrize("case", ["llama", "llama-tied-wide-heads", "qwen2"])
def test_the_file_has_what_llama_cpps_loader_requires(tmp_path, case):
    vocab = len(build_tiny_tokenizer())
    if case == "llama":
        model = build_tiny_llama(vocab, rope_theta=500_000.0)
    elif case == "llama-tied-wide-heads":  # head_dim 32 x 4 heads != hidden 64: key_length must be written
        model = build_tiny_llama(vocab, tie_word_embeddings=True, head_dim=32)
    else:
        model = _qwen2(vocab)
    config: LlamaConfig = model.config
    arch = "qwen2" if case == "qwen2" else "llama"
    reader = gguf.GGUFReader(_write(tmp_path, model, case))
    field = reader.fields
    assert field["general.architecture"].contents() == arch

    written = {k.removeprefix(f"{arch}.") for k in field if k.startswith(f"{arch}.")}
    assert written <= LLAMA_CPP_READS, written - LLAMA_CPP_READS
    assert LLAMA_CPP_REQUIRES <= written, LLAMA_CPP_REQUIRES - written
    hp = _hparams(reader, arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # the values llama.cpp reads, defaults included, are the model's
    assert hp == {
        "n_embd": config.hidden_size,
        "n_layer": config.num_hidden_layers,
        "n_ff": config.intermediate_size,
        "n_head": config.num_attention_heads,
        "n_head_kv": config.num_key_value_heads,
        "head_k": head_dim,
        "head_v": head_dim,
        "n_rot": head_dim,  # LLM_ARCH_LLAMA throws "invalid n_rot" unless it equals head_k
        "n_vocab": config.vocab_size,
    }
    assert field[f"{arch}.context_length"].contents() == config.max_position_embeddings
    assert field[f"{arch}.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(config.rms_norm_eps)
    # optional, default 10000: a model with another base must say so
    assert field[f"{arch}.rope.freq_base"].contents() == config.rope_parameters["rope_theta"]
    if f"{arch}.vocab_size" in field:
        assert field[f"{arch}.vocab_size"].contents() == hp["n_vocab"]

    tensors = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    required, optional = llama_cpp_tensors(arch, hp)
    assert set(required) <= set(tensors), sorted(set(required) - set(tensors))
    assert set(tensors) <= set(required) | set(optional), sorted(set(tensors) - set(required) - set(optional))
    expected = required | optional
    assert {n: s for n, s in tensors.items() if s != expected[n]} == {}
    assert ("output.weight" in tensors) == (not config.tie_word_embeddings)

    # the vocabulary: a gpt2 one needs merges, and every special id must be a token
    assert field["tokenizer.ggml.model"].contents() == "gpt2" and len(
        field["tokenizer.ggml.merges"].contents()
    )
    for special in ("bos", "eos", "padding", "unknown"):
        if f"tokenizer.ggml.{special}_token_id" in field:
            assert 0 <= field[f"tokenizer.ggml.{special}_token_id"].contents() < hp["n_vocab"]
