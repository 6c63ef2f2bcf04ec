"""`abba export --format gguf` for SentencePiece bases (Llama 2, Mistral 7B): the `llama` vocabulary of the base's
tokenizer.model, read back by transformers' GGUF loader and compared with the run's tokenizer, with sentencepiece
itself and with the logits of base + adapter.

The tokenizer is a SentencePiece BPE model with byte fallback trained here (well under a second) with the
settings Llama 2's tokenizer.model uses, then given the added tokens a chat model carries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
spm = pytest.importorskip(
    "sentencepiece", reason="the sentencepiece package is not installed (the dev extra)"
)
pytest.importorskip(
    "google.protobuf", reason="transformers reads tokenizer.model through protobuf (the dev extra)"
)

from conftest import TINY_DECODER, build_tiny_llama  # noqa: E402
from helpers import cli, cli_error_line, make_chat_run, make_run, max_rel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM  # noqa: E402

from abba_cli.adapters import load_adapter  # noqa: E402
from abba_cli.ship.gguf_export import TOLERANCE  # noqa: E402
from abba_cli.ship.gguf_vocab import find_sentencepiece_model, sentencepiece_vocabulary  # noqa: E402

_LINES = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Response:",
    "The answer is: 42. The answer is: -3.5",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Please choose the correct answer to the question. Answer format: answer1/answer2/answer3",
    "0 1 2 3 4 5 6 7 8 9 + - * / = $ \\frac{1}{2} x^2 , . ? ! ( ) [ ] { } < > | _ # : ;",
]
SPM_VOCAB = 400  # 3 specials, 256 byte pieces, the corpus' characters and merges
ADDED = {"<|im_start|>": True, "<|im_end|>": True, "<think>": False}  # content -> special
MODEL_VOCAB = (
    SPM_VOCAB + len(ADDED) + 1
)  # one embedding row beyond the tokenizer, as padded vocabularies have
TEXTS = [
    "Hello world",
    "The answer is: 42</s>",  # a special token in the text
    "Grüße aus 東京 🚀 naïve",  # characters the model never saw: byte fallback
    "<|im_start|>user\nWhat is 6 * 7?<|im_end|>",
    "a <think> b",  # a user-defined added token
    "tabs\tand\n\nnewlines  and  double spaces",
    " leading space",
    "  two leading spaces",
]


def _train_sentencepiece(folder: Path) -> Path:
    (folder / "corpus.txt").write_text("\n".join(_LINES * 3), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / "spm"),
        model_type="bpe",
        vocab_size=SPM_VOCAB,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return folder / "spm.model"


@pytest.fixture(scope="module")
def spm_model_file(tmp_path_factory) -> Path:
    return _train_sentencepiece(tmp_path_factory.mktemp("spm"))


def _base(folder: Path, spm_model_file: Path, mistral: bool) -> Path:
    """A hub-like SentencePiece base: tokenizer.model, tokenizer.json and tokenizer_config.json as transformers
    writes them for it, with the added tokens; a tiny Llama or Mistral with one embedding row per id."""
    folder.mkdir()
    shutil.copyfile(spm_model_file, folder / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": [t for t, special in ADDED.items() if special]})
    tok.add_tokens([t for t, special in ADDED.items() if not special])
    tok.save_pretrained(folder)
    shape = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
    if mistral:
        torch.manual_seed(0)
        cfg = MistralConfig(
            vocab_size=MODEL_VOCAB,
            **TINY_DECODER,
            sliding_window=256,  # longer than every check prompt: the same attention as llama.cpp's there
            **shape,
        )
        model = MistralForCausalLM(cfg)
    else:
        model = build_tiny_llama(MODEL_VOCAB, **shape)
    model.save_pretrained(folder)
    return folder


def _logits(model, tok, texts) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(**tok(t, return_tensors="pt")).logits[0].float() for t in texts]


@pytest.mark.parametrize(("mistral", "dtype"), [(False, "f16"), (True, "q8_0")])
def test_sentencepiece_base_exports_the_llama_vocabulary(tmp_path, caplog, spm_model_file, mistral, dtype):
    base = _base(tmp_path / "base", spm_model_file, mistral)
    build = make_run if mistral else make_chat_run  # a chat-trained run: its template must reach the file
    run = build(tmp_path / "run", base, type="abba", r1=2, r2=2, alpha=1.0)
    out = tmp_path / "ship" / "model.gguf"
    result = cli("export", "--format", "gguf", "--out", out, "--run", run, "--dtype", dtype)
    assert result.exit_code == 0, result.output
    assert "GGUF check passed" in result.output and "tokenizer llama/default" in result.output
    assert ("sliding window of 256 tokens" in result.output) == mistral
    # gguf's warning about the pair template llama.cpp never uses ("Unknown separator token '<s>' ...") is quiet
    assert [r.getMessage() for r in caplog.records if r.name == "gguf.vocab"] == []

    # the metadata, against sentencepiece's own view of the model file
    sp = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    reader = gguf.GGUFReader(out)
    field = reader.fields
    assert field["general.architecture"].contents() == "llama"
    assert field["tokenizer.ggml.model"].contents() == "llama"
    assert field["tokenizer.ggml.pre"].contents() == "default"
    tokens, scores = field["tokenizer.ggml.tokens"].contents(), field["tokenizer.ggml.scores"].contents()
    types = field["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(scores) == len(types) == MODEL_VOCAB
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert list(embedding.shape) == [64, MODEL_VOCAB]  # GGUF lists dimensions innermost first
    assert tokens[:SPM_VOCAB] == [sp.IdToPiece(i) for i in range(SPM_VOCAB)]
    assert scores[:SPM_VOCAB] == pytest.approx([sp.GetScore(i) for i in range(SPM_VOCAB)])
    kinds = gguf.TokenType
    byte_a = sp.PieceToId("<0x41>")
    normal = next(
        i for i in range(SPM_VOCAB) if not sp.IsByte(i) and not sp.IsControl(i) and not sp.IsUnknown(i)
    )
    assert types[byte_a] == kinds.BYTE and types[normal] == kinds.NORMAL
    # sentencepiece's own specials keep its types (llama.cpp's reference Llama vocabulary has the same), though
    # transformers lists them as added special tokens
    assert [types[i] for i in (0, 1, 2)] == [kinds.UNKNOWN, kinds.CONTROL, kinds.CONTROL]
    added = {t: SPM_VOCAB + k for k, t in enumerate(ADDED)}
    assert [tokens[i] for i in added.values()] == list(ADDED)
    assert [types[i] for i in added.values()] == [kinds.CONTROL, kinds.CONTROL, kinds.USER_DEFINED]
    assert [scores[i] for i in added.values()] == [
        -1000.0
    ] * 3  # as llama.cpp's converter scores added tokens
    assert tokens[-1] == f"[PAD{MODEL_VOCAB - 1}]" and types[-1] == kinds.UNUSED
    ids = {
        k: field[f"tokenizer.ggml.{k}"].contents()
        for k in ("bos_token_id", "eos_token_id", "unknown_token_id")
    }
    assert ids == {"bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0}
    assert field["tokenizer.ggml.add_bos_token"].contents() is True

    # read back by transformers: the run's token ids on every text, and sentencepiece's where it defines them
    tok = AutoTokenizer.from_pretrained(base)
    served = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in TEXTS:
        assert served(text)["input_ids"] == tok(text)["input_ids"], text
    plain = [t for t in TEXTS if not t.startswith(" ") and not any(s in t for s in ("</s>", *ADDED))]
    for text in plain:
        # A leading space is where transformers' Llama tokenizer (and so the run) and sentencepiece differ:
        # Metaspace adds no prefix space before one, sentencepiece's add_dummy_prefix always does (llama.cpp too).
        assert served(text)["input_ids"] == [1, *sp.encode(text)], text
    if not mistral:
        chat = served.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert chat == "<|im_start|>user\nhi<|im_end|>\n"

    adapted = AutoModelForCausalLM.from_pretrained(base).eval()
    load_adapter(adapted, run)
    bare = _logits(AutoModelForCausalLM.from_pretrained(base).eval(), tok, TEXTS)
    ref = _logits(adapted, tok, TEXTS)
    read = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype="float32").eval()
    got = _logits(read, tok, TEXTS)
    assert max_rel(ref, got) < TOLERANCE[dtype]
    assert max_rel(ref, bare) > 10 * max_rel(ref, got)  # the adapter is in the file, not just the base


def test_a_bare_model_file_gives_sentencepieces_own_types(tmp_path, spm_model_file):
    shutil.copyfile(spm_model_file, tmp_path / "tokenizer.model")
    tokens, scores, types = sentencepiece_vocabulary(tmp_path, SPM_VOCAB + 2)
    kinds = gguf.TokenType
    assert types[:3] == [kinds.UNKNOWN, kinds.CONTROL, kinds.CONTROL]
    assert types[-2:] == [kinds.UNUSED] * 2 and tokens[-2:] == [f"[PAD{SPM_VOCAB}]", f"[PAD{SPM_VOCAB + 1}]"]


def test_a_fast_sentencepiece_tokenizer_without_its_model_file_is_refused(tmp_path, spm_model_file):
    base = _base(tmp_path / "base", spm_model_file, mistral=False)
    (base / "tokenizer.model").unlink()
    run = make_run(tmp_path / "run", base, type="abba", r1=2, r2=2, alpha=1.0)
    out = tmp_path / "model.gguf"
    result = cli("export", "--format", "gguf", "--out", out, "--run", run)
    assert result.exit_code == 2, result.output
    line = cli_error_line(result)
    assert "SentencePiece" in line and "no tokenizer.model" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "run"]


def test_a_hub_bases_tokenizer_model_is_found_in_the_hub_cache(tmp_path, monkeypatch, spm_model_file):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--org--spm-base" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    shutil.copyfile(spm_model_file, snapshot / "tokenizer.model")
    (tmp_path / "hub" / "models--org--spm-base" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--spm-base" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_sentencepiece_model("org/spm-base", {}) == snapshot / "tokenizer.model"
    assert find_sentencepiece_model("org/not-cached", {}) is None
    assert find_sentencepiece_model(str(snapshot.parent), {}) is None  # a folder without one
