"""`abba export` writes the run's tokenizer and prompt format beside the adapter: transformers, loading the export
folder alone, renders the prompt training rendered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import CHATML, cli, cli_error_line, make_chat_run, make_run
from transformers import AutoTokenizer

from abba_cli.data.prompts import chat_prompt, render_prompt, user_message
from abba_cli.ship.export import export_run
from abba_cli.ship.export_tokenizer import PROMPT_FORMAT_FILE, alpaca_chat_template

INSTRUCTION = "  Natalia sold 48 clips in April and half as many in May. How many in all?\n"
EXPORTS = [("peft-lora", None), ("peft-loha", None), ("peft-lora", 1)]


def _served_prompt(export_dir: Path, content: str) -> str:
    tok = AutoTokenizer.from_pretrained(export_dir)
    messages = [{"role": "user", "content": content}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _chat_run(tmp_path: Path, model_dir: Path) -> Path:
    return make_chat_run(tmp_path / "run", model_dir, type="abba", r1=2, r2=2)


def _first_checkpoint(run: Path) -> Path:
    """RUN_DIR/checkpoints/step-1 holding the run's adapter, as training leaves one."""
    step = run / "checkpoints" / "step-1"
    step.mkdir(parents=True)
    shutil.copy(run / "adapter_model.safetensors", step)
    (step / "state.json").write_text(json.dumps({"step": 1}))
    return step


@pytest.mark.parametrize(("format", "rank"), EXPORTS)
def test_alpaca_run_exports_its_prompt_as_the_chat_template(tiny_model_dir, tmp_path, format, rank):
    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=2, r2=2)
    out = tmp_path / "export"
    export_run(format=format, out=out, run=run, rank=rank)

    trained = render_prompt(INSTRUCTION)
    assert _served_prompt(out, INSTRUCTION) == trained
    served = AutoTokenizer.from_pretrained(out)
    base = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert served(trained)["input_ids"] == base(trained)["input_ids"]  # the vocabulary is the base's
    record = json.loads((out / PROMPT_FORMAT_FILE).read_text())
    assert record["format"] == "alpaca" and record["prompt"] == render_prompt("{instruction}")
    assert record["prompt_with_input"].format(instruction="a", input="b") == render_prompt("a", "b")


def test_chat_run_exports_the_template_it_trained_with(tiny_model_dir, tmp_path):
    run = _chat_run(tmp_path, tiny_model_dir)
    out = tmp_path / "export"
    result = cli("export", "--out", out, "--run", run)
    assert result.exit_code == 0, result.output
    assert "chat template the run trained with" in result.output

    base = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert _served_prompt(out, user_message(INSTRUCTION)) == chat_prompt(base, CHATML, INSTRUCTION)
    assert json.loads((out / PROMPT_FORMAT_FILE).read_text())["format"] == "chat_template"


def test_a_checkpoint_export_carries_the_runs_format(tiny_model_dir, tmp_path):
    step = _first_checkpoint(_chat_run(tmp_path, tiny_model_dir))
    out = tmp_path / "export"
    export_run(format="peft-lora", out=out, run=step)
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML


def test_alpaca_template_keeps_a_bos_the_tokenizer_adds(tiny_model_dir):
    """Servers encode a rendered template without special tokens: the BOS training saw must be in the text."""
    from tokenizers import processors

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.bos_token = "<|endoftext|>"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.bos_token_id)]
    )
    trained = tok(render_prompt(INSTRUCTION))["input_ids"]
    assert trained[0] == tok.bos_token_id
    tok.chat_template = alpaca_chat_template(tok.bos_token)
    text = tok.apply_chat_template([{"role": "user", "content": INSTRUCTION}], tokenize=False)
    assert tok(text, add_special_tokens=False)["input_ids"] == trained


def test_alpaca_template_refuses_roles_training_never_saw(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = alpaca_chat_template()
    with pytest.raises(Exception, match="Alpaca"):
        tok.apply_chat_template(
            [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], tokenize=False
        )


def test_unreadable_base_tokenizer_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    run = make_run(tmp_path / "run", base, type="abba", r1=2, r2=2)
    out = tmp_path / "export"
    result = cli("export", "--out", out, "--run", run)
    assert result.exit_code == 2
    assert "tokenizer" in cli_error_line(result) and "--base" in cli_error_line(result)
    assert not out.exists()


def test_a_checkpoint_merge_carries_the_runs_chat_template(tiny_model_dir, tmp_path):
    from abba_cli.ship.merge import merge_run

    step = _first_checkpoint(_chat_run(tmp_path, tiny_model_dir))
    merge_run(out=tmp_path / "merged", run=step, dtype="fp32")
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == CHATML
