"""train.loss_impl chunked against full: the same summed loss and gradients (fp32) for ABBA, LoRA and full
fine-tuning, with tied input and output embeddings, and chunks small enough that every micro-batch takes several;
no fp32 tensor as large as the micro-batch's logits is ever made; `auto` and the refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

from abba_cli.adapters import adapter_layers, inject_adapters
from abba_cli.config import AdapterConfig
from abba_cli.data.tokenize import IGNORE_INDEX
from abba_cli.errors import UserError
from abba_cli.train import linear_cross_entropy
from abba_cli.train.loss import micro_batch_loss, resolve_loss_impl

VOCAB = 96


@pytest.fixture
def small_chunks(monkeypatch):
    # 7-token chunks: the 3 x 12 batch below (about 26 target rows) takes 4 chunks, the last one short.
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_ELEMENTS", 7 * VOCAB)
    monkeypatch.setattr(linear_cross_entropy, "MIN_CHUNK_TOKENS", 1)


def _model(adapter: str):
    model = build_tiny_llama(VOCAB, seed=1, tie_word_embeddings=True).float()
    if adapter == "full":
        model.requires_grad_(True)
        return model
    cfg = {"abba": dict(type="abba", r1=2, r2=2, alpha=2.0), "lora": dict(type="lora", r=4, alpha=8.0)}[
        adapter
    ]
    inject_adapters(model, AdapterConfig(**cfg, target_modules=["q_proj", "v_proj", "down_proj"]), seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every factor nonzero, so every factor's gradient is too
        for _, layer in adapter_layers(model):
            for p in layer.factors().values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _batch():
    gen = torch.Generator().manual_seed(5)
    input_ids = torch.randint(2, VOCAB, (3, 12), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding
    labels = input_ids.clone()
    labels[attention_mask == 0] = IGNORE_INDEX
    labels[:, :3] = IGNORE_INDEX  # a prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _loss_and_grads(model, impl: str) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = micro_batch_loss(model, _batch(), impl)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


@pytest.mark.parametrize("adapter", ["abba", "lora", "full"])
def test_chunked_matches_full_loss_and_gradients(adapter, small_chunks):
    model = _model(adapter)
    loss_full, grads_full = _loss_and_grads(model, "full")
    loss_chunked, grads_chunked = _loss_and_grads(model, "chunked")
    assert loss_chunked == pytest.approx(loss_full, rel=1e-6)
    assert grads_full.keys() == grads_chunked.keys() and grads_full
    for name, ref in grads_full.items():
        err = (grads_chunked[name] - ref).abs().max() / ref.abs().max()
        assert err < 1e-5, (name, float(err))
    if adapter == "full":  # the tied weight's gradient holds both the embedding's and the head's parts
        assert "model.embed_tokens.weight" in grads_full and "lm_head.weight" not in grads_full


def test_chunked_matches_full_under_bf16_autocast(small_chunks):
    # Backward replays forward's autocast: the same bf16 matmuls, so the same gradients up to summation order.
    model = _model("abba")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_full, grads_full = _loss_and_grads(model, "full")
        loss_chunked, grads_chunked = _loss_and_grads(model, "chunked")
    assert loss_chunked == pytest.approx(loss_full, rel=1e-5)
    for name, ref in grads_full.items():
        assert (grads_chunked[name] - ref).abs().max() <= 1e-2 * ref.abs().max(), name


class _LargestLogits(TorchDispatchMode):
    """The most elements of any fp32 tensor with a vocabulary-sized last dimension (logits or their gradient)
    that an op allocated (views of the weight excluded)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape[-1:] == (VOCAB,):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_never_holds_the_micro_batch_logits(small_chunks):
    model = _model("lora")
    batch = _batch()
    logits_size = batch["input_ids"].numel() * VOCAB
    with _LargestLogits() as seen:
        micro_batch_loss(model, batch, "chunked").backward()
    assert seen.largest <= 7 * VOCAB < logits_size
    with _LargestLogits() as seen:
        micro_batch_loss(model, batch, "full").backward()
    assert seen.largest >= logits_size  # what the chunked loss avoids


class _Cfg:
    def __init__(self, impl: str, micro_batch_size: int, max_seq_len: int):
        self.train = type("T", (), {"loss_impl": impl, "micro_batch_size": micro_batch_size})
        self.data = type("D", (), {"max_seq_len": max_seq_len})


def test_auto_takes_chunked_only_where_it_saves_memory():
    model = _model("lora")
    one_chunk = linear_cross_entropy.chunk_tokens(VOCAB)
    assert resolve_loss_impl(_Cfg("auto", 1, one_chunk), model) == "full"
    assert resolve_loss_impl(_Cfg("auto", 2, one_chunk), model) == "chunked"
    assert resolve_loss_impl(_Cfg("full", 8, 4096), model) == "full"
    assert resolve_loss_impl(_Cfg("chunked", 1, 8), model) == "chunked"


def test_chunked_refuses_a_model_that_scales_its_logits():
    model = _model("lora")
    model.config.logit_scale = 0.5
    with pytest.raises(UserError, match="train.loss_impl chunked: .*logit_scale"):
        resolve_loss_impl(_Cfg("chunked", 8, 4096), model)
    assert resolve_loss_impl(_Cfg("auto", 8, 4096), model) == "full"


def _tiny_gemma2(softcap: float):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(2)
    config = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=softcap, attn_implementation="eager",
    )  # fmt: skip
    model = Gemma2ForCausalLM(config).float()
    inject_adapters(
        model, AdapterConfig(type="abba", r1=2, r2=2, alpha=2.0, target_modules=["q_proj"]), seed=0
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # logits of order 1-5, where a cap of 0.5 bends them
        for _, layer in adapter_layers(model):
            for p in layer.factors().values():
                p.normal_(0.0, 0.2)
    return model


def test_chunked_applies_gemma2s_final_logit_softcap(small_chunks):
    # A cap small enough that tanh bends the logits: the chunked loss must cap each chunk as Gemma-2 does.
    model = _tiny_gemma2(softcap=0.5)
    assert resolve_loss_impl(_Cfg("auto", 8, 4096), model) == "chunked"
    loss_full, grads_full = _loss_and_grads(model, "full")
    loss_chunked, grads_chunked = _loss_and_grads(model, "chunked")
    assert loss_chunked == pytest.approx(loss_full, rel=1e-6)
    for name, ref in grads_full.items():
        assert (grads_chunked[name] - ref).abs().max() <= 1e-5 * ref.abs().max(), name
    model.config.final_logit_softcapping = None  # without the cap the loss differs: the test sees the cap
    assert float(micro_batch_loss(model, _batch(), "chunked").detach()) != pytest.approx(loss_full, rel=1e-2)
    model.config.final_logit_softcapping = 0.5
    with pytest.raises(UserError, match="train.loss_impl liger: .*final_logit_softcapping"):
        resolve_loss_impl(_Cfg("liger", 8, 4096), model)
