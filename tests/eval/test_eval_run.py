"""`abba eval` end to end on the tiny fixture model, generation details, and the bundled SmolLM2 (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import cli

from abba_cli.eval.generate import generate
from abba_cli.eval.results import format_table
from abba_cli.eval.target import load_model_for_eval
from abba_cli.eval.tasks import COMMONSENSE_TASKS, resolve_tasks


def _invoke(*args: str):
    result = cli(*["eval", *args])
    return result, result.output + (getattr(result, "stderr", "") or "")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def adapter_run(tiny_model_dir, tmp_path) -> Path:
    """A run directory with a non-zero ABBA adapter on the tiny model (B2 randomised, so dW != 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    from abba_cli.adapters import adapter_layers, inject_adapters, save_adapter
    from abba_cli.config import AdapterConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = AdapterConfig(type="abba", r1=2, r2=2, target_modules=["q_proj", "v_proj", "down_proj"])
    inject_adapters(model, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.B2.copy_(torch.randn(layer.B2.shape, generator=gen))
    run_dir = tmp_path / "run"
    save_adapter(model, cfg, run_dir, base_model=str(tiny_model_dir))
    return run_dir


# ------------------------------------------------------------------------------------------ tasks


def test_commonsense_expands_to_all_eight_and_dedupes():
    tasks = resolve_tasks(["gsm8k", "commonsense", "piqa"])
    assert tasks == ["gsm8k", *COMMONSENSE_TASKS]
    assert len(COMMONSENSE_TASKS) == 8


def test_unknown_task_is_a_user_error_listing_valid_tasks(tiny_model_dir, tmp_path):
    result, out = _invoke("--task", "gsm9k", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "gsm9k" in out and "gsm8k" in out and "commonsense" in out
    assert "Traceback" not in out
    assert not (tmp_path / "o").exists()


def test_no_task_is_a_user_error(tiny_model_dir, tmp_path):
    result, out = _invoke("--model", str(tiny_model_dir), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "--task" in out


def test_no_run_and_no_model_without_a_finished_run(tmp_path):
    result, out = _invoke("--task", "gsm8k")
    assert result.exit_code == 2 and "--run" in out


# ------------------------------------------------------------------------------------------ generation


PROMPTS = [
    "Below is an instruction that describes a task.",
    "The answer is: 42",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "solution1 solution2",
    "### Instruction:",
]


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir):
    return load_model_for_eval(str(tiny_model_dir), None)


def test_batched_left_padded_generation_matches_one_at_a_time(tiny_loaded):
    # With left padding and the attention mask, a prompt's greedy output must not depend on its batch-mates.
    model, tok, device = tiny_loaded
    assert tok.padding_side == "left"
    single = generate(model, tok, PROMPTS, batch_size=1, max_new_tokens=12, device=device)
    batched = generate(model, tok, PROMPTS, batch_size=4, max_new_tokens=12, device=device)
    assert batched == single
    assert all(single)  # the tiny model does produce text, so the comparison means something
    assert len(set(single)) > 1  # and outputs are not all the same: order was kept, not shuffled


def test_stop_strings_cut_generation(tiny_loaded):
    model, tok, device = tiny_loaded
    free = generate(model, tok, PROMPTS[:2], batch_size=2, max_new_tokens=24, device=device)
    # Pick a stop string the model really produces part-way through its first output.
    text = free[0]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    stopped = generate(model, tok, PROMPTS[:2], batch_size=2, max_new_tokens=24, stop=[stop], device=device)
    assert stopped[0] == text[: text.find(stop)]
    assert stop not in stopped[1]
    assert stopped[1] == free[1][: free[1].find(stop)] if stop in free[1] else stopped[1] == free[1]


# ------------------------------------------------------------------------------------------ end to end


def test_eval_plain_model_writes_predictions_and_metrics_without_clobbering(tiny_model_dir, tmp_path):
    out_dir = tmp_path / "results"
    common = ["--model", str(tiny_model_dir), "--limit", "3", "--max-new-tokens", "8", "--out", str(out_dir)]
    result, out = _invoke("--task", "gsm8k,piqa", "--batch-size", "2", *common)
    assert result.exit_code == 0, out
    assert "accuracy" in out and "gsm8k" in out and "piqa" in out

    for task, answer_type in (("gsm8k", "number"), ("piqa", "choice")):
        preds = _read_jsonl(out_dir / task / "predictions.jsonl")
        assert len(preds) == 3
        assert set(preds[0]) == {"id", "prompt", "output", "extracted", "gold", "correct"}
        assert preds[0]["prompt"].startswith("Below is an instruction") and preds[0]["prompt"].endswith(
            "### Response:\n"
        )
        metrics = json.loads((out_dir / task / "metrics.json").read_text())
        assert metrics["task"] == task and metrics["n"] == 3 and metrics["limit"] == 3
        assert metrics["correct"] == sum(p["correct"] for p in preds)
        assert metrics["invalid"] == sum(p["extracted"] is None for p in preds)
        assert metrics["accuracy"] == pytest.approx(metrics["correct"] / 3)
        assert metrics["answer_type"] == answer_type
        assert metrics["model"] == str(tiny_model_dir) and metrics["adapter_run"] is None
        assert metrics["generation"]["max_new_tokens"] == 8 and metrics["generation"]["do_sample"] is False
        assert metrics["generation"]["batch_size"] == 2
        assert metrics["examples_per_s"] > 0
    piqa_gold = [p["gold"] for p in _read_jsonl(out_dir / "piqa" / "predictions.jsonl")]
    assert set(piqa_gold) <= {"solution1", "solution2"}

    # A second task into the same results dir leaves the first task's files untouched.
    before = {p: p.read_bytes() for p in (out_dir / "gsm8k").iterdir()}
    result, out = _invoke("--task", "boolq", "--skip", "2", *common)
    assert result.exit_code == 0, out
    assert {p: p.read_bytes() for p in (out_dir / "gsm8k").iterdir()} == before
    boolq = json.loads((out_dir / "boolq" / "metrics.json").read_text())
    assert boolq["n"] == 3 and boolq["skip"] == 2
    assert [p["id"] for p in _read_jsonl(out_dir / "boolq" / "predictions.jsonl")] == [
        "boolq-2",
        "boolq-3",
        "boolq-4",
    ]
    assert sorted(p.name for p in out_dir.iterdir()) == ["boolq", "gsm8k", "piqa"]  # no temp files left


def test_model_alone_defaults_to_eval_results_dir(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result, out = _invoke(
        "--task", "boolq", "--model", str(tiny_model_dir), "--limit", "1", "--max-new-tokens", "2"
    )
    assert result.exit_code == 0, out
    assert (tmp_path / "eval-results" / tiny_model_dir.name / "boolq" / "metrics.json").is_file()


def test_adapter_is_merged_in_memory(adapter_run, tiny_model_dir):
    """The eval model's weights are W0 + s (B1 A1) * (B2 A2), recomputed here from the saved files."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from abba_cli.adapters import AdapterLinear

    model, _, _ = load_model_for_eval(str(tiny_model_dir), adapter_run)
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())  # plain Linear: base-model speed
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    factors = load_file(adapter_run / "adapter_model.safetensors")
    s = json.loads((adapter_run / "adapter_config.json").read_text())["scaling"]
    name = "model.layers.1.self_attn.v_proj"
    f = {k.rsplit(".", 1)[1]: v.double() for k, v in factors.items() if k.startswith(name + ".")}
    dw = s * (f["B1"] @ f["A1"]) * (f["B2"] @ f["A2"])
    assert dw.abs().max() > 1e-3
    w0 = base.get_submodule(name).weight.double()
    got = model.get_submodule(name).weight.double().cpu()
    torch.testing.assert_close(got, w0 + dw, atol=1e-5, rtol=1e-5)
    untouched = "model.layers.0.self_attn.k_proj"  # not a target: unchanged
    torch.testing.assert_close(
        model.get_submodule(untouched).weight.cpu(), base.get_submodule(untouched).weight
    )


def test_eval_defaults_to_latest_run_and_writes_into_it(adapter_run):
    from abba_cli.run.latest import record_latest

    record_latest(adapter_run)
    result, out = _invoke("--task", "siqa", "--limit", "2", "--max-new-tokens", "4")
    assert result.exit_code == 0, out
    metrics = json.loads((adapter_run / "eval" / "siqa" / "metrics.json").read_text())
    assert metrics["adapter_run"] == str(adapter_run.resolve())
    assert metrics["n"] == 2
    assert len(_read_jsonl(adapter_run / "eval" / "siqa" / "predictions.jsonl")) == 2


def test_run_config_eval_section_gives_default_tasks_and_limit(adapter_run, tiny_model_dir):
    import yaml

    cfg = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"recipe": "gsm8k"},
        "eval": {"tasks": ["boolq"], "limit": 2, "skip": 5, "batch_size": 2},
        "output_dir": str(adapter_run),
    }
    (adapter_run / "config.yaml").write_text(yaml.safe_dump(cfg))
    result, out = _invoke("--run", str(adapter_run), "--max-new-tokens", "2")
    assert result.exit_code == 0, out
    metrics = json.loads((adapter_run / "eval" / "boolq" / "metrics.json").read_text())
    assert (metrics["n"], metrics["limit"], metrics["skip"]) == (2, 2, 5)
    assert metrics["generation"]["batch_size"] == 2
    ids = [p["id"] for p in _read_jsonl(adapter_run / "eval" / "boolq" / "predictions.jsonl")]
    assert ids == ["boolq-5", "boolq-6"]
    # The command line wins over the run config.
    result, out = _invoke(
        "--run", str(adapter_run), "--task", "piqa", "--limit", "1", "--max-new-tokens", "2"
    )
    assert result.exit_code == 0, out
    assert json.loads((adapter_run / "eval" / "piqa" / "metrics.json").read_text())["n"] == 1
    # An explicit --skip 0 overrides the run's eval.skip (0 is a value, not "unset").
    result, out = _invoke("--run", str(adapter_run), "--skip", "0", "--max-new-tokens", "2", "--overwrite")
    assert result.exit_code == 0, out
    ids = [p["id"] for p in _read_jsonl(adapter_run / "eval" / "boolq" / "predictions.jsonl")]
    assert ids == ["boolq-0", "boolq-1"]


def test_adapter_on_a_model_of_other_shapes_is_refused(adapter_run, tiny_model_dir_other, tmp_path):
    result, out = _invoke(
        "--task",
        "boolq",
        "--run",
        str(adapter_run),
        "--model",
        str(tiny_model_dir_other),
        "--limit",
        "1",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.exit_code == 2, out
    assert "shape" in out and str(adapter_run) in out
    assert "Traceback" not in out
    assert not (tmp_path / "o").exists()


def test_format_table():
    from abba_cli.eval.results import TaskResult

    table = format_table(
        [TaskResult("gsm8k", 4, 1, 2, 1.0, Path("x")), TaskResult("arc_c", 0, 0, 0, 0.0, Path("y"))]
    )
    lines = table.splitlines()
    assert lines[0].split() == ["task", "n", "accuracy", "invalid"]
    assert lines[1].split() == ["gsm8k", "4", "25.00%", "2"]


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_bundled_smollm2_on_five_gsm8k_problems(tmp_path):
    """The real bundled SmolLM2-135M-Instruct (dequantized 4-bit GGUF) through the whole eval path."""
    # The hub id falls back to the session's converted copy (conftest's ABBA_MODELS_DIR): converted once.
    out_dir = tmp_path / "smol"
    result, out = _invoke(
        "--task",
        "gsm8k",
        "--model",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "--limit",
        "5",
        "--max-new-tokens",
        "128",
        "--batch-size",
        "5",
        "--out",
        str(out_dir),
    )
    assert result.exit_code == 0, out
    preds = _read_jsonl(out_dir / "gsm8k" / "predictions.jsonl")
    metrics = json.loads((out_dir / "gsm8k" / "metrics.json").read_text())
    print(
        json.dumps(
            {k: metrics[k] for k in ("n", "correct", "accuracy", "invalid", "seconds", "examples_per_s")}
        )
    )
    assert metrics["n"] == 5 and [p["gold"] for p in preds] == ["18", "3", "70000", "540", "20"]
    # A 135M model writes real English about the problem (not garbage, not empty). Stop strings and the stored
    # verdicts are checked against hand-written outputs in tests/eval/test_eval_known_outputs.py.
    assert all(len(p["output"].split()) >= 3 for p in preds)
