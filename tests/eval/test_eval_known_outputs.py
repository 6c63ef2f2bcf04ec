"""`abba eval` end to end with outputs known in advance: the tiny model's `generate` is replaced by one that
writes a scripted answer per problem (through the real tokenizer, batching, decoding and stop strings), so each
stored verdict can be compared with one decided by hand, for a number task (gsm8k) and a LaTeX one (math)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli

# The first problems of the bundled test sets (golds 18, 3, 70000, 540 and 2, 10, \dfrac{9}{7}, i), keyed by a
# phrase of the problem: (scripted output, hand-decided correct, hand-decided invalid).
GSM8K = {
    # The stop string really occurs: without the cut, the last "The answer is" would read 99.
    "Janet’s ducks": (
        "16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\nThe answer is: 18\n\n### Instruction:\nThe answer is: 99",
        True,
        False,
    ),
    "A robe takes": ("2 + 1 = 3 bolts.\nThe answer is: 4", False, False),
    "Josh decides": ("He made a profit of seventy thousand dollars.", False, True),
    "James decides": ("3 * 3 * 60 = 540\nThe answer is: 540.0", True, False),
}
# MATH --limit takes a fixed shuffle across the subjects: these are its first four, in source order
# (golds 60, -2, 72^\\circ, 180).
MATH_IDS = ["math-76", "math-879", "math-2004", "math-4022"]
MATH = {
    "sqrt[3]{12}": (
        "The product is $\\sqrt[3]{12 \\cdot 20 \\cdot 15 \\cdot 60}$.\nThe answer is: $60$",
        True,
        False,
    ),
    "3x^2 + 14x + 8": ("So $A = 2$ and $B = 4$, and $A - B$ is $\\boxed{-2}$.", True, False),
    # The gold's 72^\\circ, written another way.
    "placed on a circle": ("The answer is: $72^{\\circ}$", True, False),
    "committee of three students": ("The answer is: $36$", False, False),
}


@pytest.fixture
def scripted_generate(monkeypatch):
    """LlamaForCausalLM.generate returning prompt + the scripted answer whose key the prompt contains."""
    from transformers import LlamaForCausalLM

    scripts = {**GSM8K, **MATH}
    prompts_seen: list[str] = []

    def generate(self, input_ids, attention_mask, generation_config, tokenizer, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = tokenizer.decode(ids[mask.bool()])
            prompts_seen.append(prompt)
            (answer,) = [out for key, (out, _, _) in scripts.items() if key in prompt]
            new = tokenizer(answer, add_special_tokens=False)["input_ids"][: generation_config.max_new_tokens]
            rows.append(new + [tokenizer.eos_token_id])
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        new_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=input_ids.dtype)
        return torch.cat([input_ids, new_ids], dim=1)

    monkeypatch.setattr(LlamaForCausalLM, "generate", generate)
    return prompts_seen


@pytest.mark.parametrize(("task", "script"), [("gsm8k", GSM8K), ("math", MATH)], ids=["gsm8k", "math"])
def test_stored_verdicts_are_the_hand_decided_ones(tmp_path, tiny_model_dir, scripted_generate, task, script):
    out_dir = tmp_path / "results"
    args = ["eval", "--task", task, "--model", str(tiny_model_dir), "--limit", "4", "--batch-size", "3"]
    result = cli(*[*args, "--out", str(out_dir)])
    assert result.exit_code == 0, result.output
    assert len(scripted_generate) == 4  # every problem went through the (scripted) model once

    preds = [json.loads(line) for line in (out_dir / task / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == (MATH_IDS if task == "math" else [f"{task}-{i}" for i in range(4)])
    expected = list(script.values())  # the keys are in the problems' order
    for p, (output, correct, invalid) in zip(preds, expected, strict=True):
        assert p["output"].strip() == output.split("### Instruction")[0].strip()
        assert (p["correct"], p["extracted"] is None) == (correct, invalid), p
    metrics = json.loads((out_dir / task / "metrics.json").read_text())
    n_correct = sum(c for _, c, _ in expected)
    n_invalid = sum(i for _, _, i in expected)
    assert (metrics["n"], metrics["correct"], metrics["invalid"]) == (4, n_correct, n_invalid)
    assert metrics["accuracy"] == pytest.approx(n_correct / 4)
    assert f"{100 * n_correct / 4:.2f}%" in result.output  # the printed table agrees


def test_gsm8k_extracted_answers_are_the_numbers_after_the_last_marker(
    tmp_path, tiny_model_dir, scripted_generate
):
    out_dir = tmp_path / "results"
    args = ["eval", "--task", "gsm8k", "--model", str(tiny_model_dir), "--limit", "4", "--out", str(out_dir)]
    assert cli(*args).exit_code == 0
    preds = [json.loads(line) for line in (out_dir / "gsm8k" / "predictions.jsonl").read_text().splitlines()]
    assert [p["extracted"] for p in preds] == ["18", "4", None, "540.0"]
    assert [p["gold"] for p in preds] == ["18", "3", "70000", "540"]
