"""Shared fixtures: a tiny Llama and tokenizer built offline, saved like a hub checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:",
    "### Input:",
    "### Response:",
    "The answer is: 42",
    "The answer is: -3.5",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Please choose the correct answer to the question. Answer format: answer1/answer2/answer3/answer4/answer5",
    "solution1 solution2 option1 option2 ending1 ending2 ending3 ending4 true false",
    "0 1 2 3 4 5 6 7 8 9 + - * / = $ \\frac{1}{2} x^2 , . ? ! ( ) [ ] { }",
]


def build_tiny_tokenizer():
    """A byte-level BPE trained in memory on a few lines: any text encodes, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


# The decoder shape of every tiny test model (Llama, Mistral, Qwen2 alike): 2 layers, width 64, grouped KV heads.
TINY_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def build_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=vocab_size,
        **TINY_DECODER,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=1,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Llama + tokenizer saved with save_pretrained (fp32, safetensors)."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(len(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir_other(tmp_path_factory) -> Path:
    """Same tokenizer, different shapes (hidden 96): for 'adapter from another base' errors."""
    out = tmp_path_factory.mktemp("tiny-llama-other")
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(len(tok), hidden_size=96, intermediate_size=160)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path):
    """Each test gets its own ABBA_HOME (latest-run marker) and never reaches the hub.

    Its own MonkeyPatch, not the test's `monkeypatch`: a test that calls monkeypatch.undo() to drop its own
    patches must not also drop these (it would write the real ~/.cache/abba-cli and reach for the hub)."""
    with pytest.MonkeyPatch.context() as isolated:
        isolated.setenv("ABBA_HOME", str(tmp_path / "abba-home"))
        isolated.setenv("HF_HUB_OFFLINE", "1")
        isolated.setenv("HF_DATASETS_OFFLINE", "1")
        _fresh_hub_probe()
        yield


def _fresh_hub_probe() -> None:
    from abba_cli.util import hub

    hub._reachable.cache_clear()  # the probe result is cached per process; tests fake the network
    hub._noted.clear()  # so are the notes said once per process (e.g. "hub unavailable")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config) -> None:
    # `make test` runs two pytest-xdist workers on two cores: one torch thread each, not two apiece.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def abba_models_dir(tmp_path_factory) -> Path:
    """One converted-models cache per test run, shared by the xdist workers, so the bundled SmolLM2 is converted
    at most once."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    path = root / "abba-models"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(autouse=True)
def _shared_models_dir(abba_models_dir):
    # ABBA_HOME is per test; the model cache is per session (converting SmolLM2 takes ~20-35 s).
    with pytest.MonkeyPatch.context() as isolated:
        isolated.setenv("ABBA_MODELS_DIR", str(abba_models_dir))
        yield


@pytest.fixture(scope="session")
def smollm2_dir(abba_models_dir) -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF converted to a normal HF folder by abba_cli.models.loading (real, offline)."""
    import os

    from filelock import FileLock

    from abba_cli.models.bundled import bundled_smollm2_dir

    old = os.environ.get("ABBA_MODELS_DIR")
    os.environ["ABBA_MODELS_DIR"] = str(abba_models_dir)
    try:
        with FileLock(str(abba_models_dir / "convert.lock")):  # one worker converts, the other waits for it
            return bundled_smollm2_dir()
    finally:
        if old is None:
            os.environ.pop("ABBA_MODELS_DIR", None)
        else:
            os.environ["ABBA_MODELS_DIR"] = old
