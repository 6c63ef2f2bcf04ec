"""The numbers of a training step, each against a reference written here: the next-token loss (float64), its
normalisation over the target tokens of the whole optimizer step, the learning-rate schedule, gradient clipping
and AdamW's weight decay. Every run is `run_training` on the tiny fixture model, read back through metrics.jsonl
and the saved adapter."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_raw_config, train_in_process, write_jsonl
from safetensors.torch import load_file

from abba_cli.config import RunConfig
from abba_cli.train.loss import target_loss_sum

# Four problems of clearly different lengths: per-micro-batch averaging then weighs tokens differently from
# one average over the step's target tokens.
ROWS = [
    {
        "question": "Natalia sold 48 clips" + " to her friends" * k + "?",
        "answer": "so " * (3 * k) + f"#### {k}",
    }
    for k in (0, 3, 1, 5)
]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _cfg(tmp_path: Path, model_dir: Path, out: str, **train) -> RunConfig:
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    settings = {
        "micro_batch_size": 4,
        "max_steps": 1,
        "scheduler": "constant",
        "max_grad_norm": None,
        **train,
    }
    raw = tiny_raw_config(
        tmp_path,
        model_dir,
        out,
        adapter={"target_modules": TARGETS},
        data={"path": str(data)},
        train=settings,
    )
    return RunConfig.model_validate(raw)


def _initial_model(cfg: RunConfig):
    """The base with the adapters as training initialises them (seeded per layer), plus the tokenizer."""
    from abba_cli.adapters import inject_adapters
    from abba_cli.models.loading import load_base

    model, tok = load_base(cfg.model.name_or_path, cfg.model.dtype)
    tok.padding_side = "right"
    inject_adapters(model, cfg.adapter, seed=cfg.train.seed)
    model.config.use_cache = False
    return model, tok


def _all_examples_batch(cfg: RunConfig, tok) -> dict[str, torch.Tensor]:
    """Every training example in one right-padded batch (one step of micro-batch 4 reads exactly these)."""
    from abba_cli.data.collate import make_collator
    from abba_cli.data.recipes import load_examples, load_recipe
    from abba_cli.data.tokenize import build_train_dataset

    examples = load_examples(load_recipe("gsm8k"), path=cfg.data.path)
    ds = build_train_dataset(examples, tok, cfg.data.max_seq_len)
    return make_collator(tok)([ds[i] for i in range(len(ds))])


def _reference_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum over positions t with labels[b, t+1] != -100 of -log softmax(logits[b, t])[labels[b, t+1]], float64."""
    total = 0.0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            row = [float(x) for x in logits[b, t].double()]
            peak = max(row)
            log_z = peak + math.log(sum(math.exp(x - peak) for x in row))
            total += log_z - row[target]
    return total


# ----------------------------------------------------------------------------------------------- the loss


def test_target_loss_sum_is_the_shifted_cross_entropy_over_target_tokens():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 7, generator=gen) * 3
    labels = torch.tensor([[-100, -100, 3, 5, 0, -100], [-100, 6, 2, 2, -100, -100]])
    got = float(target_loss_sum(logits, labels))
    assert got == pytest.approx(_reference_cross_entropy_sum(logits, labels), rel=1e-6)
    # Hand check of the alignment: logits at position t predict labels[t + 1] (row 0 targets 3, 5, 0).
    only_first = torch.full_like(labels, -100)
    only_first[0, 2] = 3
    want = -torch.log_softmax(logits[0, 1].double(), dim=-1)[3]
    assert float(target_loss_sum(logits, only_first)) == pytest.approx(float(want), rel=1e-6)


def test_logged_loss_is_the_mean_over_the_target_tokens_of_the_whole_step(tmp_path, tiny_model_dir):
    """Micro-batches of 1 accumulated over the 4 examples: the step's loss is sum(CE) / all target tokens, not the
    mean of the four per-example means. B2 starts at 0, so step 1 runs the base model exactly."""
    cfg = _cfg(tmp_path, tiny_model_dir, "run", micro_batch_size=1, grad_accum_steps=4)
    metrics, _ = train_in_process(cfg)
    model, tok = _initial_model(cfg)
    batch = _all_examples_batch(cfg, tok)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total = _reference_cross_entropy_sum(logits, batch["labels"])
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    per_example = [(batch["labels"][i, 1:] != -100).sum().item() for i in range(len(ROWS))]
    assert len(set(per_example)) == len(ROWS)  # lengths differ, so the two averages differ
    assert metrics[0]["loss"] == pytest.approx(total / n_targets, rel=1e-5)


def test_accumulation_trains_exactly_like_one_big_micro_batch(tmp_path, tiny_model_dir):
    """Micro-batch 1 x accumulation 2 and micro-batch 2 x accumulation 1 see the same examples per step."""
    steps = dict(max_steps=2, max_grad_norm=1.0)
    small, a = train_in_process(
        _cfg(tmp_path, tiny_model_dir, "small", micro_batch_size=1, grad_accum_steps=2, **steps)
    )
    big, b = train_in_process(
        _cfg(tmp_path, tiny_model_dir, "big", micro_batch_size=2, grad_accum_steps=1, **steps)
    )
    assert [m["loss"] for m in small] == pytest.approx([m["loss"] for m in big], rel=1e-5)
    assert a.keys() == b.keys()
    # Weights after two AdamW steps at lr 1e-2: an element whose gradient is near Adam's eps moves by an amount
    # that follows the gradient's last bits, which differ with the summation order (micro-batch 1 + 1 vs 2, the
    # thread count). atol 1e-5 is a thousandth of one lr-sized step; an accumulation bug (per-micro-batch means,
    # a lost micro-batch) moves the factors by a sizeable part of lr. transformers 5.24 showed 1.7e-6 here.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    assert any(float(a[k].abs().max()) > 0 for k in a if k.endswith(".B2"))  # it trained: not 0 == 0


# ----------------------------------------------------------------------------------------------- schedule

# 5 steps, warmup_ratio 0.4 -> 2 warmup steps; the lr logged at step k is the one step k used (schedule index
# k - 1). Written out by hand: linear decays to 0 at step 6, cosine follows 0.5 (1 + cos(pi * i / 3)).
SCHEDULES = {
    "linear": [0.0, 0.5, 1.0, 2 / 3, 1 / 3],
    "cosine": [0.0, 0.5, 1.0, 0.75, 0.25],
    "constant": [0.0, 0.5, 1.0, 1.0, 1.0],
}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULES))
def test_lr_per_step_follows_warmup_and_the_schedule(tmp_path, tiny_model_dir, scheduler):
    schedule = dict(scheduler=scheduler, warmup_ratio=0.4, save_every=1, save_total_limit=5)
    cfg = _cfg(tmp_path, tiny_model_dir, "run", micro_batch_size=1, max_steps=5, **schedule)
    metrics, _ = train_in_process(cfg)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert [m["lr"] for m in metrics] == pytest.approx([1e-2 * f for f in SCHEDULES[scheduler]], abs=1e-12)
    # The logged lr is the applied one: step 1 at lr 0 leaves the adapter at its initialisation.
    from abba_cli.adapters import adapter_state_dict

    init = adapter_state_dict(_initial_model(cfg)[0])
    after_1 = load_file(Path(cfg.output_dir) / "checkpoints" / "step-1" / "adapter_model.safetensors")
    assert all(torch.equal(after_1[k], init[k]) for k in init)
    after_2 = load_file(Path(cfg.output_dir) / "checkpoints" / "step-2" / "adapter_model.safetensors")
    assert any(not torch.equal(after_2[k], init[k]) for k in init)


# ----------------------------------------------------------------------------------------------- optimizer


def test_first_step_is_a_clipped_adamw_step_with_weight_decay(tmp_path, tiny_model_dir):
    """One step, rebuilt by hand: gradient of the step's mean loss, its norm (logged), clipping to max_grad_norm,
    then AdamW's first update p <- p (1 - lr wd) - lr g / (|g| + eps) (bias-corrected moments equal g and g^2).

    max_grad_norm is tiny so that the clipped gradient is comparable to eps: with clipping off the update is
    about lr * sign(g), with it on about half of that. Weight decay shows on A2, whose gradient is zero at B2=0.
    """
    lr, wd, max_norm, eps = 1e-2, 0.1, 1e-6, 1e-8
    cfg = _cfg(tmp_path, tiny_model_dir, "run", lr=lr, weight_decay=wd, max_grad_norm=max_norm)
    metrics, trained = train_in_process(cfg)

    from abba_cli.adapters import adapter_state_dict

    model, tok = _initial_model(cfg)
    batch = _all_examples_batch(cfg, tok)
    model(**batch).loss.backward()  # transformers' own shifted, token-averaged loss: an independent path
    params = dict(model.named_parameters())
    init = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    grads = {k: params[k].grad.double() for k in init}
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
    assert metrics[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert norm > 100 * max_norm  # so clipping really scales the gradient down

    clip = min(1.0, max_norm / (norm + 1e-6))
    for key, p0 in init.items():
        g = grads[key] * clip
        want = p0.double() * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(trained[key].double(), want, rtol=1e-4, atol=1e-7, msg=key)
    a2 = [k for k in init if k.endswith(".A2")]
    assert a2 and all(float(grads[k].abs().max()) == 0.0 for k in a2)
    assert all(not torch.equal(trained[k], init[k]) for k in a2)  # moved by weight decay alone
