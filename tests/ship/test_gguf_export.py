"""`abba export --format gguf`: the merged model as one GGUF file, read back by transformers' GGUF loader (an
independent reader) with the logits of base + adapter, the run's tokenizer and its prompt format."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")

from helpers import cli, cli_error_line, make_chat_run, make_run  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, Qwen2Config  # noqa: E402

from abba_cli.adapters import load_adapter  # noqa: E402
from abba_cli.data.prompts import render_prompt  # noqa: E402
from abba_cli.errors import UserError  # noqa: E402
from abba_cli.ship.export import export_run  # noqa: E402
from abba_cli.ship.gguf_export import TOLERANCE  # noqa: E402
from abba_cli.ship.gguf_file import gguf_architecture, permute_for_llama_cpp  # noqa: E402

PROMPTS = ("Natalia sold clips to 48 of her friends in April.", "The answer is: 42")


def _run(tmp_path: Path, model_dir: Path, chat: bool) -> Path:
    # alpha 1: an update the size of W0 (a trained adapter's scale), so rounding stays far inside the tolerances.
    build = make_chat_run if chat else make_run
    return build(tmp_path / "run", model_dir, type="abba", r1=2, r2=2, alpha=1.0)


def _rel(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    scale = max(float(r.abs().max()) for r in ref)
    return max(float((r - g).abs().max()) for r, g in zip(ref, got, strict=True)) / scale


def _logits(model, tok) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(**tok(p, return_tensors="pt")).logits[0].float() for p in PROMPTS]


@pytest.mark.parametrize(("dtype", "chat"), [("f16", True), ("q8_0", False)])
def test_gguf_reads_back_as_base_plus_adapter(tiny_model_dir, tmp_path, dtype, chat):
    run = _run(tmp_path, tiny_model_dir, chat)
    out = tmp_path / "ship" / "model.gguf"
    result = cli("export", "--format", "gguf", "--out", out, "--run", run, "--dtype", dtype)
    assert result.exit_code == 0, result.output
    assert "GGUF check passed" in result.output and sorted(p.name for p in out.parent.iterdir()) == [
        "model.gguf"
    ]

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    adapted = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    load_adapter(adapted, run)
    bare = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tok)
    ref = _logits(adapted.eval(), tok)
    read = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype="float32").eval()
    got = _logits(read, tok)
    assert _rel(ref, got) < TOLERANCE[dtype]
    assert _rel(ref, bare) > 10 * _rel(ref, got)  # the adapter is in the file, not just the base

    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "llama"
    # the tiny tokenizer is none of the families llama.cpp names: its default split, said once
    assert (
        reader.fields["tokenizer.ggml.pre"].contents() == "default" and "writing 'default'" in result.output
    )
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    assert kinds == {dtype.upper()}
    served = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    content = [{"role": "user", "content": "What is 6 * 7?"}]
    text = served.apply_chat_template(content, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\nWhat is 6 * 7?<|im_end|>\n<|im_start|>assistant\n"
        if chat
        else render_prompt("What is 6 * 7?")
    )
    assert served(PROMPTS[0])["input_ids"] == tok(PROMPTS[0])["input_ids"]


def test_a_layout_error_is_caught_and_nothing_is_written(tiny_model_dir, tmp_path, monkeypatch):
    import abba_cli.ship.gguf_file as gguf_file

    monkeypatch.setattr(
        gguf_file, "permute_for_llama_cpp", lambda weight, n_head: weight
    )  # HF's layout as is
    run = _run(tmp_path, tiny_model_dir, chat=False)
    out = tmp_path / "model.gguf"
    with pytest.raises(UserError, match="not those of the merged weights") as err:
        export_run(format="gguf", out=out, run=run, dtype="f16")
    assert "nothing was written" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left either


def test_permutation_interleaves_each_heads_rotary_halves():
    # 2 heads of dim 4, one input column: HF rows (h0: a0 a1 | b0 b1), llama.cpp rows (h0: a0 b0 a1 b1).
    w = torch.arange(8.0).reshape(8, 1)
    assert permute_for_llama_cpp(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_other_architectures_and_rope_scaling_are_refused():
    with pytest.raises(UserError, match="GPT2LMHeadModel; GGUF export supports the Llama family"):
        gguf_architecture(GPT2Config(architectures=["GPT2LMHeadModel"]), "gpt2")
    llama3 = LlamaConfig(
        architectures=["LlamaForCausalLM"],
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    with pytest.raises(UserError, match="'llama3' rotary scaling"):
        gguf_architecture(llama3, "llama-3.1")
    wide = Qwen2Config(architectures=["Qwen2ForCausalLM"], hidden_size=64, num_attention_heads=4, head_dim=32)
    with pytest.raises(UserError, match="4 heads of 32, not hidden_size 64 wide"):
        gguf_architecture(wide, "qwen2-wide")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bad_gguf_input_is_one_line_and_loses_nothing(tiny_model_dir, tmp_path):
    run = _run(tmp_path, tiny_model_dir, chat=False)
    existing = tmp_path / "model.gguf"
    existing.write_bytes(b"the user's own file")
    before = _digest(existing)
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "architectures": ["Phi3ForCausalLM"]}))
    cases = [
        (["--out", existing], ["exists", "--overwrite"]),
        (["--out", tmp_path], ["is a directory", "model.gguf"]),
        (["--out", tmp_path / "a.gguf", "--dtype", "q4_k"], ["--dtype 'q4_k'", "f16, bf16, q8_0"]),
        (["--out", tmp_path / "a.gguf", "--rank", "2"], ["--rank applies to --format peft-lora only"]),
        (["--out", tmp_path / "a.gguf", "--base", other], ["Phi3ForCausalLM", "Llama family"]),
    ]
    for args, words in cases:
        result = cli("export", "--format", "gguf", "--run", run, *args)
        assert result.exit_code == 2, (args, result.output)
        line = cli_error_line(result)
        assert all(w in line for w in words), line
    for option, value in (("--dtype", "f16"), ("--onto", "dequantized")):
        result = cli("export", "--format", "peft-lora", "--run", run, "--out", tmp_path / "p", option, value)
        assert result.exit_code == 2 and f"{option} applies to --format gguf only" in cli_error_line(result)
    assert _digest(existing) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "other-base", "run"]


@pytest.mark.slow
def test_smollm2_tokenizer_gets_llama_cpps_pre_tokenizer_name(smollm2_dir):
    """The fingerprint text is llama.cpp's exactly: SmolLM2's tokenizer hashes to the `smollm` entry (the bundled
    GGUF, written by llama.cpp's converter, says `smollm` too)."""
    from abba_cli.ship.gguf_vocab import pre_tokenizer

    assert pre_tokenizer(AutoTokenizer.from_pretrained(smollm2_dir)) == "smollm"
