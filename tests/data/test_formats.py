"""Users' own data files: chat, text and pre-tokenized formats, bad files and rows, drop_long, the cache,
group_by_length, and the chat template shared by training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import build_tiny_tokenizer
from helpers import cli

from abba_cli.config import DataConfig
from abba_cli.data.cache import cache_dir
from abba_cli.data.formats import ChatExample, TextExample, TokenizedExample
from abba_cli.data.order import length_grouped_order
from abba_cli.data.prompts import prompt_renderer
from abba_cli.data.recipes import load_examples
from abba_cli.data.tokenize import IGNORE_INDEX, build_train_dataset
from abba_cli.data.training_set import prepare_train_dataset, run_chat_template
from abba_cli.errors import UserError

REPO = Path(__file__).resolve().parents[2]
# ChatML, as SmolLM2/Qwen write it; a second copy marks assistant text with {% generation %}.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_GEN = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TWO_TURNS = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 6 * 7?"},
    {"role": "assistant", "content": "The answer is: 42"},
    {"role": "user", "content": "And 6 + 7?"},
    {"role": "assistant", "content": "The answer is: 13"},
)


@pytest.fixture()
def tok():
    t = build_tiny_tokenizer()
    t.chat_template = CHATML
    return t


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _targets(ds, row: int = 0) -> list[int]:
    return [t for t in ds[row]["labels"] if t != IGNORE_INDEX]


def _cli_error(args: list[str]) -> str:
    result = cli(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # one line, no traceback
    return lines[0]


# ------------------------------------------------------------------------------------------ bad files


def test_non_utf8_bytes_name_the_file_line_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError) as err:
        load_examples("text", path=str(path))
    assert str(path) in str(err.value) and "line 2, column 14" in str(err.value) and "0xe9" in str(err.value)


def test_broken_jsonl_names_its_own_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c",}\n')
    with pytest.raises(UserError, match=r"d\.jsonl: line 4, column \d+: invalid JSON"):
        load_examples("text", path=str(path))


@pytest.mark.parametrize(
    ("content", "said"),
    [("42", "got a number"), ("[[1, 2], [3]]", "row 0: expected a JSON object"), ('"x"', "got a string")],
)
def test_json_that_is_not_a_list_of_objects_is_one_clear_line(tmp_path, content, said):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        load_examples("text", path=str(path))
    assert str(path) in str(err.value) and said in str(err.value)


def test_null_field_is_an_error_not_the_text_none(tmp_path):
    path = _jsonl(
        tmp_path / "m.jsonl", [{"query": "q1", "response": "r1"}, {"query": "q2", "response": None}]
    )
    with pytest.raises(UserError) as err:
        load_examples("metamathqa", path=str(path))
    msg = str(err.value)
    assert "row 1" in msg and str(path) in msg and "'response' is null" in msg


def test_null_input_means_no_input(tmp_path):
    rows = [{"instruction": "Add.", "input": None, "output": "5", "answer": "5"}]
    [ex] = load_examples("commonsense170k", path=str(_jsonl(tmp_path / "c.jsonl", rows)))
    assert ex.input is None and ex.instruction == "Add."


# ------------------------------------------------------------------------------------------ chat rows


@pytest.mark.parametrize(
    ("messages", "said"),
    [
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown role 'human'"),
        (
            [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}],
            "message 0 (user): content",
        ),
        ([{"role": "user", "content": None}, {"role": "assistant", "content": "x"}], "content must be"),
        ("hello", "'messages' must be a non-empty list"),
    ],
)
def test_bad_chat_rows_name_file_and_row(tmp_path, messages, said):
    good = {"messages": list(TWO_TURNS)}
    path = _jsonl(tmp_path / "chat.jsonl", [good, good, {"messages": messages}])
    with pytest.raises(UserError) as err:
        load_examples("chat", path=str(path))
    assert f"local file {path}, row 2" in str(err.value) and said in str(err.value)


def test_a_wrong_field_name_lists_the_fields_present(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [{"conversations": list(TWO_TURNS)}])
    with pytest.raises(UserError, match=r"row 0: no 'messages' field \(fields present: conversations\)"):
        load_examples("chat", path=str(path))


def test_validate_reads_the_data_before_any_model(tmp_path):
    """A bad row (or a missing data.path) is found even though the model does not exist at all."""
    bad = _jsonl(tmp_path / "chat.jsonl", [{"messages": list(TWO_TURNS)}, {"messages": [TWO_TURNS[1]]}])
    cfg = {
        "model": {"name_or_path": str(tmp_path / "no-model")},
        "data": {"recipe": "chat", "path": str(bad)},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(tmp_path / "run")}))
    line = _cli_error(["validate", str(path)])
    assert "row 1" in line and str(bad) in line and "no assistant turn" in line
    line = _cli_error(["validate", str(path), "--set", f"data.path={tmp_path / 'gone.jsonl'}"])
    assert "gone.jsonl: no such file" in line
    line = _cli_error(["validate", str(path), "--set", "data.recipe=chat", "--set", "data.path=null"])
    assert "set data.path" in line


# ------------------------------------------------------------------------------------------ chat tokens


@pytest.mark.parametrize("template", [CHATML, CHATML_GEN], ids=["diffed", "generation-tag"])
def test_loss_covers_every_assistant_turn_and_its_end_marker(tok, template):
    ds = build_train_dataset([ChatExample("c-0", TWO_TURNS)], tok, 512, chat_template=template)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert tok.decode(ids) == "".join(
        f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in TWO_TURNS
    )
    # The labelled tokens, read as runs, are exactly the two answers with their end-of-turn markers.
    runs, current = [], []
    for t, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == t
            current.append(t)
        elif current:
            runs.append(tok.decode(current))
            current = []
    runs += [tok.decode(current)] if current else []
    assert runs == ["The answer is: 42<|im_end|>\n", "The answer is: 13<|im_end|>\n"]


def test_chat_train_on_inputs_covers_the_whole_conversation(tok):
    ds = build_train_dataset(
        [ChatExample("c-0", TWO_TURNS)], tok, 512, train_on_inputs=True, chat_template=CHATML
    )
    assert ds[0]["labels"] == ds[0]["input_ids"]


def test_tokenizer_without_chat_template_names_the_option(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": list(TWO_TURNS)}])
    with pytest.raises(UserError, match=r"has no chat template; pass one with data\.chat_template"):
        prepare_train_dataset(DataConfig(recipe="chat", path=str(path)), build_tiny_tokenizer(), "tiny")
    template = tmp_path / "t.jinja"
    template.write_text(CHATML)
    d = DataConfig(recipe="chat", path=str(path), chat_template=str(template))
    ds, _ = prepare_train_dataset(d, build_tiny_tokenizer(), "tiny")
    assert _targets(ds)  # the file's template was used


def test_chat_eval_prompt_is_the_training_prefix(tok):
    """Train = eval: the prompt evaluation of a chat-trained run feeds the model is, token for token, what the
    model saw before the answer it learnt."""
    d = DataConfig(recipe="chat", path="unused.jsonl")
    template = run_chat_template(d, tok, "tiny")
    render = prompt_renderer(tok, template)
    prompt_ids = tok(render("What is 6 * 7?"))["input_ids"]
    ex = ChatExample("c-0", TWO_TURNS[1:3])
    ds = build_train_dataset([ex], tok, 512, chat_template=template)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids)] == ids[len(prompt_ids)]
    # An Alpaca-trained run keeps the Alpaca prompt.
    assert prompt_renderer(tok, run_chat_template(DataConfig(recipe="metamathqa"), tok)) is not None
    assert "### Response:" in prompt_renderer(tok, None)("What is 6 * 7?")


# ------------------------------------------------------------------------------------- text, tokenized


def test_text_rows_train_on_every_token_and_end_with_eos(tok, tmp_path):
    [ex] = load_examples("text", path=str(_jsonl(tmp_path / "t.jsonl", [{"text": "The answer is: 42"}])))
    assert ex == TextExample("text-0", "The answer is: 42")
    ds = build_train_dataset([ex], tok, 512)
    assert ds[0]["input_ids"] == tok("The answer is: 42")["input_ids"] + [tok.eos_token_id]
    assert ds[0]["labels"] == ds[0]["input_ids"]


def test_tokenized_rows_are_used_as_given(tok, tmp_path):
    rows = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [5, 6, 7], "labels": [-100, -100, 7]}]
    examples = load_examples("tokenized", path=str(_jsonl(tmp_path / "t.jsonl", rows)))
    assert examples[1] == TokenizedExample("tokenized-1", (5, 6, 7), (-100, -100, 7))
    ds = build_train_dataset(examples, tok, 512)
    assert ds["input_ids"] == [[5, 6, 7, 8], [5, 6, 7]]
    assert ds["labels"] == [[5, 6, 7, 8], [-100, -100, 7]]
    assert ds["length"] == [4, 3]


@pytest.mark.parametrize(
    ("row", "said"),
    [
        ({"input_ids": [1, 2], "labels": [1]}, "'labels' has 1 entries but 'input_ids' has 2"),
        ({"input_ids": [1, -5]}, "'input_ids' holds -5"),
        ({"input_ids": [1, 2], "labels": [-100, -100]}, "nothing to train on"),
        ({"input_ids": "1 2"}, "must be a non-empty list"),
    ],
)
def test_bad_tokenized_rows(tmp_path, row, said):
    with pytest.raises(UserError, match="row 0") as err:
        load_examples("tokenized", path=str(_jsonl(tmp_path / "t.jsonl", [row])))
    assert said in str(err.value)


def test_token_ids_beyond_the_vocabulary_are_an_error(tok):
    with pytest.raises(UserError, match="tokenized-0: input_ids holds 400, beyond the tokenizer's 400"):
        build_train_dataset([TokenizedExample("tokenized-0", (1, 400), None)], tok, 512)


# ------------------------------------------------------------------------------------------ drop_long


def test_over_long_examples_are_cut_by_default_and_dropped_with_drop_long(tok, capsys):
    short = TokenizedExample("t-0", (1, 2, 3), None)
    long = TokenizedExample("t-1", tuple(range(2, 12)), None)
    cut = build_train_dataset([short, long], tok, 6)
    assert cut["input_ids"] == [[1, 2, 3], [2, 3, 4, 5, 6, 7]]
    kept = build_train_dataset([short, long], tok, 6, drop_long=True)
    assert kept["id"] == ["t-0"]
    assert "dropped 1 of 2 examples longer than data.max_seq_len 6" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ cache


def test_cache_is_reused_and_keyed_by_what_changes_the_tokens(tok, tmp_path, capsys):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "The answer is: 42"}, {"text": "The answer is: 7"}])
    d = DataConfig(recipe="text", path=str(path))
    first, val = prepare_train_dataset(d, tok, "tiny")
    assert val is None
    assert "cached in" in capsys.readouterr().err and len(list(cache_dir().iterdir())) == 1
    again, _ = prepare_train_dataset(d, tok, "tiny")
    assert "reusing the cache" in capsys.readouterr().err
    assert again.to_list() == first.to_list()
    # Each of these changes the tokens, so each gets its own entry.
    prepare_train_dataset(d.model_copy(update={"max_seq_len": 4}), tok, "tiny")
    other_tok = build_tiny_tokenizer()
    other_tok.add_tokens(["answer is"])
    prepare_train_dataset(d, other_tok, "tiny")
    _jsonl(path, [{"text": "The answer is: 42"}, {"text": "The answer is: 8"}])
    changed, _ = prepare_train_dataset(d, tok, "tiny")
    assert "reusing" not in capsys.readouterr().err and changed["input_ids"] != first["input_ids"]
    assert len(list(cache_dir().iterdir())) == 4
    prepare_train_dataset(d.model_copy(update={"cache": False, "max_seq_len": 5}), tok, "tiny")
    assert len(list(cache_dir().iterdir())) == 4


# ------------------------------------------------------------------------------------- group_by_length


def _padding(lengths: list[int], order: list[int], batch: int) -> int:
    chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
    return sum(max(lengths[i] for i in c) * len(c) - sum(lengths[i] for i in c) for c in chunks)


def test_group_by_length_is_a_seeded_permutation_with_less_padding():
    import random

    from abba_cli.data.order import epoch_order

    rng = random.Random(3)
    lengths = [rng.randint(5, 400) for _ in range(1000)]
    order = length_grouped_order(lengths, seed=1, epoch=0, batch_size=8)
    assert sorted(order) == list(range(1000))
    assert order == length_grouped_order(lengths, seed=1, epoch=0, batch_size=8)  # same on every process
    assert order != length_grouped_order(lengths, seed=1, epoch=1, batch_size=8)
    assert order != length_grouped_order(lengths, seed=2, epoch=0, batch_size=8)
    random_pad = _padding(lengths, epoch_order(1000, 1, 0), 8)
    assert _padding(lengths, order, 8) < random_pad / 5


def test_group_by_length_batch_stream_resumes_exactly():
    from abba_cli.data.order import batch_stream

    lengths = [(7 * i) % 31 + 1 for i in range(37)]
    per_epoch = 10  # ceil(37 / (2 * 2))

    def stream(skip: int, rank: int) -> list:
        s = batch_stream(37, 2, 5, 2, rank, skip, per_epoch, lengths)
        return [next(s) for _ in range(25 - skip)]

    full = stream(0, 0)
    assert stream(13, 0) == full[13:]  # resuming at micro-batch 13 continues the same stream
    # The two processes of a global batch get disjoint halves of the same similar-length group.
    for (_, _, a), (_, _, b) in zip(stream(0, 0)[:9], stream(0, 1)[:9], strict=True):
        assert not set(a) & set(b)


# ------------------------------------------------------------------------------------------ examples


@pytest.mark.parametrize("fmt", ["alpaca", "chat", "text", "tokenized"])
def test_shipped_example_files_load_through_their_recipe(fmt):
    examples = load_examples(fmt, path=str(REPO / "examples" / "data" / f"{fmt}.jsonl"))
    assert len(examples) >= 2 and all(e.id == f"{fmt}-{i}" for i, e in enumerate(examples))
    if fmt == "alpaca":
        assert examples[0].input is None and examples[1].input == "Is the sun a star?"
    if fmt == "chat":
        assert [m["role"] for m in examples[1].messages].count("assistant") == 2


def test_held_out_validation_rows_of_a_chat_file_are_tokenized_apart(tok, tmp_path):
    rows = [
        {"messages": [TWO_TURNS[1], {"role": "assistant", "content": f"The answer is: {i}"}]}
        for i in range(5)
    ]
    d = DataConfig(recipe="chat", path=str(_jsonl(tmp_path / "c.jsonl", rows)), val_samples=2)
    train, val = prepare_train_dataset(d, tok, "tiny")
    assert len(train) == 3 and len(val) == 2 and not set(train["id"]) & set(val["id"])
    assert all(_targets(val, i) for i in range(2))


# ------------------------------------------------------------------------------------------ end to end


def test_chat_run_trains_grouped_reuses_the_cache_and_evaluates_through_its_template(
    tmp_path, tiny_model_dir
):
    from transformers import AutoTokenizer

    from abba_cli.eval.target import resolve_target, train_prompt_renderer

    def config(out: str) -> Path:
        raw = {
            "model": {"name_or_path": str(tiny_model_dir)},
            "adapter": {"type": "abba", "r1": 2, "r2": 2},
            "data": {
                "recipe": "chat",
                "path": str(REPO / "examples" / "data" / "chat.jsonl"),
                "chat_template": CHATML,
                "group_by_length": True,
                "max_seq_len": 512,
            },
            "train": {"micro_batch_size": 1, "max_steps": 2, "lr": 1e-2, "warmup_ratio": 0.0},
            "output_dir": str(tmp_path / out),
        }
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    first = cli(*["train", str(config("a"))])
    assert first.exit_code == 0, first.output
    assert "cached in" in first.stderr
    second = cli(*["train", str(config("b"))])
    assert second.exit_code == 0, second.output
    assert "reusing the cache" in second.stderr
    target = resolve_target(tmp_path / "b", None, None)
    prompt = train_prompt_renderer(target, AutoTokenizer.from_pretrained(tiny_model_dir))("What is 6 * 7?")
    assert prompt == "<|im_start|>user\nWhat is 6 * 7?<|im_end|>\n<|im_start|>assistant\n"
