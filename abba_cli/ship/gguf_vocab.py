"""The tokenizer as GGUF metadata (`tokenizer.ggml.*`), the two vocabularies llama.cpp's converter writes for the
Llama family (convert_hf_to_gguf.py: `_set_vocab_gpt2`, `_set_vocab_sentencepiece`):

- `gpt2`: byte-level BPE (SmolLM2, Qwen2, Llama 3): tokens, token types and merges, with the pre-tokenizer named
  by the same fingerprint llama.cpp uses;
- `llama`: SentencePiece (Llama 2, Mistral 7B): every piece of the base's `tokenizer.model` with its score and
  type (normal, unknown, control, unused, byte), then the tokenizer's added tokens (control when special,
  user-defined otherwise). llama.cpp's SentencePiece tokenizer merges by these scores, so they come from the
  model file itself; a fast tokenizer (tokenizer.json) alone carries merges but no scores and is refused.

Both end with the special ids, add_bos/add_eos and the chat template, read by gguf's SpecialVocab.
"""

from __future__ import annotations

import json
import logging
from hashlib import sha256
from pathlib import Path
from typing import Any

from abba_cli.errors import UserError

SENTENCEPIECE_FILE = "tokenizer.model"
# llama.cpp names a BPE pre-tokenizer by the sha256 of str(tokenizer.encode(PRE_TOKENIZER_PROBE)); these are the
# fingerprints of the families above, from convert_hf_to_gguf.py's get_vocab_base_pre.
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}
# Added tokens some models leave unmarked though they are control tokens (convert_hf_to_gguf.py's
# does_token_look_special), besides the <|...|> form.
_LOOK_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
_SPACE_PIECE = "\u2581"  # SentencePiece's visible space


def pre_tokenizer(tokenizer: Any) -> str | None:
    """llama.cpp's name for this tokenizer's pre-tokenizer, or None when it is not one of PRE_TOKENIZERS."""
    ids = tokenizer.encode(PRE_TOKENIZER_PROBE)
    return PRE_TOKENIZERS.get(sha256(str(ids).encode()).hexdigest())


def tokenizer_kind(tokenizer_dir: Path) -> str:
    """`gpt2` or `llama` (llama.cpp's names) for the tokenizer saved in `tokenizer_dir`; UserError (one line) for a
    tokenizer neither describes, or a SentencePiece-style one without its tokenizer.model."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        return "gpt2"
    sentencepiece_like = model.get("type") == "Unigram" or (
        model.get("type") == "BPE" and model.get("byte_fallback")
    )
    if not sentencepiece_like:
        raise UserError(
            f"--format gguf: the base's tokenizer is a {model.get('type', 'unknown')} model that is neither byte-level "
            "BPE (SmolLM2, Qwen2, Llama 3) nor SentencePiece (Llama 2, Mistral); merge with `abba merge` and convert "
            "with llama.cpp's convert_hf_to_gguf.py"
        )
    if not (tokenizer_dir / SENTENCEPIECE_FILE).is_file():
        raise UserError(
            f"--format gguf: the base's tokenizer is SentencePiece-style but the base has no {SENTENCEPIECE_FILE}, "
            "whose piece scores llama.cpp's `llama` vocabulary needs (tokenizer.json has none); put the base's "
            f"{SENTENCEPIECE_FILE} in its folder and pass --base PATH"
        )
    return "llama"


def find_sentencepiece_model(base: str, load_settings: dict[str, Any]) -> Path | None:
    """The base's tokenizer.model (a local folder's, or the hub cache's for a hub id), or None when it has none."""
    folder = Path(base).expanduser()
    if folder.is_dir():
        found = folder / SENTENCEPIECE_FILE
        return found if found.is_file() else None
    from transformers.utils import cached_file

    from abba_cli.util.hub import use_hub

    try:
        path = cached_file(
            base,
            SENTENCEPIECE_FILE,
            revision=load_settings.get("revision"),
            local_files_only=not use_hub(),
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except OSError:
        return None
    return Path(path) if path else None


def add_vocabulary(writer: Any, tokenizer: Any, tokenizer_dir: Path, vocab_size: int) -> str:
    """Write the tokenizer saved in `tokenizer_dir` (its chat template included) as `tokenizer.ggml.*`; returns
    the tokenizer model and pre-tokenizer written, e.g. `gpt2/smollm` or `llama/default`."""
    import gguf

    kind = tokenizer_kind(tokenizer_dir)
    if kind == "gpt2":
        pre = _add_byte_level_bpe(writer, gguf, tokenizer, vocab_size)
    else:
        pre = _add_sentencepiece(writer, gguf, tokenizer_dir, vocab_size)
    # bos/eos/unk/pad ids, add_bos/add_eos and the chat template, as llama.cpp's converter reads them; the merges
    # only for byte-level BPE (a SentencePiece vocabulary merges by score)
    # Quiet: SpecialVocab warns about the pair template (two sequences, which llama.cpp never encodes) of every
    # tokenizer transformers 5 saves with a BOS, e.g. "Unknown separator token '<s>' in TemplateProcessing<pair>".
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(tokenizer_dir, load_merges=kind == "gpt2", n_vocab=vocab_size)
    finally:
        log.setLevel(level)
    special.add_to_gguf(writer, quiet=True)
    return f"{kind}/{pre}"


def _add_byte_level_bpe(writer: Any, gguf: Any, tokenizer: Any, vocab_size: int) -> str:
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:  # embedding rows beyond the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    pre = pre_tokenizer(tokenizer)
    if pre is None:
        print(
            "note: the tokenizer's pre-tokenizer is not one llama.cpp names (smollm, llama-bpe, qwen2, tekken); "
            "writing 'default' (GPT-2's split): llama.cpp may split text differently from training"
        )
        pre = "default"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    return pre


def _add_sentencepiece(writer: Any, gguf: Any, tokenizer_dir: Path, vocab_size: int) -> str:
    tokens, scores, types = sentencepiece_vocabulary(tokenizer_dir, vocab_size)
    pre = "default"  # llama.cpp's SentencePiece tokenizer has no pre-tokenizer to name
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    config = _read_json(tokenizer_dir / "tokenizer_config.json")
    if isinstance(config.get("add_prefix_space"), bool):
        writer.add_add_space_prefix(config["add_prefix_space"])
    return pre


def sentencepiece_vocabulary(
    tokenizer_dir: Path, vocab_size: int
) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types) for `vocab_size` ids: the pieces of tokenizer.model, then the added tokens of
    added_tokens.json, tokenizer_config.json and tokenizer.json over them (but for sentencepiece's own control and
    unknown pieces), rows beyond both as unused `[PADi]`."""
    import gguf

    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise UserError(
            "--format gguf: the base's tokenizer is SentencePiece; reading its tokenizer.model needs the "
            "sentencepiece package: pip install sentencepiece"
        ) from None
    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(tokenizer_dir / SENTENCEPIECE_FILE))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for i in range(min(processor.vocab_size(), vocab_size)):  # pieces past the embeddings cannot be produced
        tokens[i], scores[i] = processor.IdToPiece(i), processor.GetScore(i)
        types[i] = int(_piece_type(processor, i, gguf))
    added_json = _read_json(tokenizer_dir / "added_tokens.json")
    for content, i in added_json.items():
        if i < vocab_size:
            tokens[i], scores[i], types[i] = content, -1000.0, int(gguf.TokenType.USER_DEFINED)
    decoder = _read_json(tokenizer_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
    added = {int(i): entry for i, entry in decoder.items()}
    added.update(_added_tokens_of(tokenizer_dir))
    own = (int(gguf.TokenType.CONTROL), int(gguf.TokenType.UNKNOWN))
    for i, entry in sorted(added.items()):
        content = entry["content"]
        if i >= vocab_size or (types[i] in own and tokens[i] == content):
            # sentencepiece's own <unk>, <s>, </s> keep its type and score, as in llama.cpp's reference Llama
            # vocabulary (models/ggml-vocab-llama-spm.gguf); transformers lists them as added tokens too
            continue
        if entry.get("special") or _looks_special(content):
            types[i] = int(gguf.TokenType.CONTROL)
        else:
            # llama.cpp matches user-defined tokens in the raw text, where a space is a space
            content = content.replace(_SPACE_PIECE, " ")
            types[i] = int(gguf.TokenType.USER_DEFINED)
        tokens[i], scores[i] = content, -1000.0
    return tokens, scores, types


def _piece_type(processor: Any, i: int, gguf: Any) -> Any:
    if processor.IsUnknown(i):
        return gguf.TokenType.UNKNOWN
    if processor.IsControl(i):
        return gguf.TokenType.CONTROL
    if processor.IsUnused(i):
        return gguf.TokenType.UNUSED
    if processor.IsByte(i):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _added_tokens_of(tokenizer_dir: Path) -> dict[int, dict[str, Any]]:
    """tokenizer.json's added tokens: transformers 5 keeps them there rather than in tokenizer_config.json."""
    spec = _read_json(tokenizer_dir / "tokenizer.json")
    return {int(t["id"]): t for t in spec.get("added_tokens") or []}


def _looks_special(content: str) -> bool:
    return content in _LOOK_SPECIAL or (content.startswith("<|") and content.endswith("|>"))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
