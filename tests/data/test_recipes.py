"""Recipes: every shipped YAML validates, renderers match LLM-Adapters' text, bundled copies load offline."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from abba_cli.data.recipes import (
    RECIPES_DIR,
    Example,
    available_recipes,
    last_boxed,
    load_examples,
    load_recipe,
    parse_recipe,
)
from abba_cli.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("path", sorted(REPO.glob("abba_cli/recipes/**/*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    recipe = parse_recipe(yaml.safe_load(path.read_text()), str(path))
    assert recipe.name == path.stem
    assert load_recipe(path.stem) == recipe


def test_recipes_are_visible_at_top_level_and_listed_by_kind():
    assert (REPO / "recipes").resolve() == RECIPES_DIR.resolve()
    assert set(available_recipes("eval")) == {
        "gsm8k",
        "math",
        "boolq",
        "piqa",
        "siqa",
        "hellaswag",
        "winogrande",
        "arc_e",
        "arc_c",
        "obqa",
    }
    assert {"metamathqa", "commonsense170k", "gsm8k_bundled_train", "commonsense_bundled_train"} <= set(
        available_recipes("train")
    )


def test_unknown_recipe_lists_valid_names():
    with pytest.raises(UserError, match="unknown recipe 'gsm9k'.*gsm8k.*piqa"):
        load_recipe("gsm9k")


def test_recipe_file_by_path_and_its_validation_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\ndescription: x\nkind: eval\nsource: {hub: {id: a/b, split: test}}\n"
        "render: {instruction: '{q}'}\ncolour: red\n"
    )
    with pytest.raises(UserError) as err:
        load_recipe(str(bad))
    assert str(err.value) == f"{bad}: colour: unknown key"
    bad.write_text(bad.read_text().replace("colour: red\n", ""))
    with pytest.raises(UserError, match="an eval recipe needs answer, generation, render.gold"):
        load_recipe(str(bad))
    with pytest.raises(UserError, match="not found"):
        load_recipe(str(tmp_path / "missing.yaml"))


# Raw rows in each dataset's ORIGINAL (hub) schema, and the exact LLM-Adapters rendering of each.
COMMONSENSE_CASES = {
    "boolq": (
        {
            "question": "does ethanol take more energy make that produces",
            "answer": False,
            "passage": "All biomass...",
        },
        "Please answer the following question with true or false, question: does ethanol take more energy make "
        "that produces?\n\nAnswer format: true/false",
        "false",
    ),
    "piqa": (
        {
            "goal": "Make outdoor pillow.",
            "sol1": "Blow into tin can and tie with rubber band.",
            "sol2": "Blow into trash bag and tie with rubber band.",
            "label": 1,
        },
        "Please choose the correct solution to the question: Make outdoor pillow.\n\n"
        "Solution1: Blow into tin can and tie with rubber band.\n\n"
        "Solution2: Blow into trash bag and tie with rubber band.\n\nAnswer format: solution1/solution2",
        "solution2",
    ),
    "siqa": (
        {
            "context": "Robin wanted to share the food with a friend, so they cut the sandwich in half.",
            "question": "What does Robin need to do before this?",
            "answerA": "get a knife",
            "answerB": "eat half of her own sandwich",
            "answerC": "give half the sandwich to her friend",
            "label": "1",
        },
        "Please choose the correct answer to the question: Robin wanted to share the food with a friend, so they "
        "cut the sandwich in half. What does Robin need to do before this?\n\nAnswer1: get a knife Answer2: eat "
        "half of her own sandwich Answer3: give half the sandwich to her friend\n\nAnswer format: "
        "answer1/answer2/answer3",
        "answer1",
    ),
    "hellaswag": (
        {
            "ind": 24,
            "activity_label": "Roof shingle removal",
            "ctx_a": "A man is sitting on a roof.",
            "ctx_b": "he",
            "ctx": "A man is sitting on a roof. he",
            "endings": [
                "is using wrap to wrap a pair of skis.",
                "is ripping level tiles off.",
                "is holding a rubik's cube.",
                "starts pulling up roofing on a roof.",
            ],
            "source_id": "activitynet~v_-JhWjGDPHMY",
            "split": "val",
            "split_type": "indomain",
            "label": "3",
        },
        "Please choose the correct ending to complete the given sentence: Roof shingle removal: A man is sitting "
        "on a roof. he\n\nEnding1: is using wrap to wrap a pair of skis. Ending2: is ripping level tiles off. "
        "Ending3: is holding a rubik's cube. Ending4: starts pulling up roofing on a roof.\n\n"
        "Answer format: ending1/ending2/ending3/ending4",
        "ending4",
    ),
    "winogrande": (
        {
            "sentence": "The jeans fit worse than the shirt because I had tried the _ on at the store.",
            "option1": "jeans",
            "option2": "shirt",
            "answer": "2",
        },
        "Please choose the correct answer to fill in the blank to complete the given sentence: The jeans fit "
        "worse than the shirt because I had tried the _ on at the store.\n\nOption1: jeans Option2: shirt "
        "Answer format: option1/option2",
        "option2",
    ),
    "arc_e": (
        {
            "id": "MCAS_2000_4_6",
            "question": "Which two things interact most in the water cycle?",
            "choices": {
                "text": [
                    "oceans and the Moon",
                    "oceans and the Sun",
                    "lakes and the Moon",
                    "lakes and the Sun",
                ],
                "label": ["A", "B", "C", "D"],
            },
            "answerKey": "B",
        },
        "Please choose the correct answer to the question: Which two things interact most in the water cycle?"
        "\n\nAnswer1: oceans and the Moon Answer2: oceans and the Sun Answer3: lakes and the Moon Answer4: lakes "
        "and the Sun\n\nAnswer format: answer1/answer2/answer3/answer4",
        "answer2",
    ),
    "arc_c": (  # numeric labels and three choices both occur in ARC
        {
            "id": "x",
            "question": "Which is a gas at room temperature?",
            "choices": {"text": ["iron", "oxygen", "salt"], "label": ["1", "2", "3"]},
            "answerKey": "2",
        },
        "Please choose the correct answer to the question: Which is a gas at room temperature?\n\n"
        "Answer1: iron Answer2: oxygen Answer3: salt\n\nAnswer format: answer1/answer2/answer3",
        "answer2",
    ),
    "obqa": (
        {
            "id": "7-980",
            "question_stem": "A hemisphere experiences summer when",
            "choices": {
                "text": [
                    "it's tilted towards Jupiter",
                    "it's angled towards the moon",
                    "it's angled towards the largest star in the solar system",
                    "it spins counter clockwise on Earth's axis",
                ],
                "label": ["A", "B", "C", "D"],
            },
            "answerKey": "C",
        },
        "Please choose the correct answer to the question: A hemisphere experiences summer when\n\n"
        "Answer1: it's tilted towards Jupiter Answer2: it's angled towards the moon Answer3: it's angled towards "
        "the largest star in the solar system Answer4: it spins counter clockwise on Earth's axis\n\n"
        "Answer format: answer1/answer2/answer3/answer4",
        "answer3",
    ),
}


@pytest.mark.parametrize("task", sorted(COMMONSENSE_CASES))
def test_commonsense_renderer_matches_llm_adapters(task, tmp_path):
    row, instruction, gold = COMMONSENSE_CASES[task]
    [ex] = load_examples(task, path=_write_jsonl(tmp_path / "rows.jsonl", [row]))
    assert ex == Example(
        id=f"{task}-0", instruction=instruction, input=None, output=f"the correct answer is {gold}", gold=gold
    )
    assert gold in load_recipe(task).answer.labels


def test_bundled_arc_schema_renders_like_the_hub_schema():
    # The oe-eval requests copy keeps ARC as "Question: ...\nAnswer:" + choices + gold index.
    ex = load_examples("arc_c", source="bundled", limit=1)[0]
    assert ex.instruction == (
        "Please choose the correct answer to the question: An astronomer observes that a planet rotates faster "
        "after a meteorite impact. Which is the most likely effect of this increase in rotation?\n\nAnswer1: "
        "Planetary density will decrease. Answer2: Planetary years will become longer. Answer3: Planetary days "
        "will become shorter. Answer4: Planetary gravity will become stronger.\n\nAnswer format: "
        "answer1/answer2/answer3/answer4"
    )
    assert ex.gold == "answer3"


BUNDLED_COUNTS = {
    "gsm8k": 1319,
    "math": 5000,
    "boolq": 3270,
    "piqa": 1838,
    "siqa": 1954,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_e": 2376,
    "arc_c": 1172,
    "obqa": 500,
}


@pytest.mark.parametrize("task", sorted(BUNDLED_COUNTS))
def test_bundled_eval_sets_have_the_documented_sizes(task):
    examples = load_examples(task, source="bundled")
    assert len(examples) == BUNDLED_COUNTS[task]
    assert len({e.id for e in examples}) == len(examples)
    recipe = load_recipe(task)
    assert all(e.gold for e in examples)
    if recipe.answer.type == "choice":
        assert {e.gold for e in examples} <= set(recipe.answer.labels)


def test_auto_source_falls_back_to_the_bundled_copy_and_says_so(capsys):
    examples = load_examples("winogrande", limit=3)  # the hub is unreachable in tests (HF_HUB_OFFLINE)
    assert len(examples) == 3
    assert "using the bundled copy" in capsys.readouterr().err


def test_gsm8k_gold_and_metamath_style_output(tmp_path):
    ex = load_examples("gsm8k", source="bundled", limit=1)[0]
    assert ex.gold == "18"
    assert ex.output == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer’s market.\nThe answer is: 18"
    )
    big = {"question": "q", "answer": "So 1,000 + 234 = <<1000+234=1234>>1,234\n#### 1,234"}
    [ex] = load_examples("gsm8k", path=_write_jsonl(tmp_path / "g.jsonl", [big]))
    assert ex.gold == "1234" and ex.output == "So 1,000 + 234 = 1,234\nThe answer is: 1234"
    assert all(
        "<<" not in e.output and e.output.endswith(f"The answer is: {e.gold}")
        for e in load_examples("gsm8k_bundled_train")
    )


def test_math_gold_is_the_last_boxed_of_the_solution(tmp_path):
    rows = [
        {"problem": "p1", "solution": "so $\\boxed{\\frac{1}{2}}$", "answer": "\\frac12"},
        {"problem": "p2", "solution": "first \\boxed{3}, then \\boxed{\\{1, 2\\}^{x}}."},
    ]
    a, b = load_examples("math", path=_write_jsonl(tmp_path / "m.jsonl", rows))
    # The copy's own 'answer' field is ignored: the bundled one is Minerva-normalised and broken.
    assert a.gold == "\\frac{1}{2}" and b.gold == "\\{1, 2\\}^{x}"
    assert b.output.endswith("\nThe answer is: \\{1, 2\\}^{x}")
    assert last_boxed("no box here") is None
    with pytest.raises(UserError, match="row 0.*cannot derive 'gold_answer'"):
        load_examples("math", path=_write_jsonl(tmp_path / "n.jsonl", [{"problem": "p", "solution": "none"}]))


def test_local_files_override_the_source(tmp_path):
    rows = [
        {"instruction": f"Q{i}", "input": "", "output": f"the correct answer is true{i}", "answer": "true"}
        for i in range(5)
    ]
    jsonl = _write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for path in (jsonl, tmp_path / "b.json", tmp_path / "c.parquet"):
        examples = load_examples("commonsense170k", path=str(path))
        assert [e.instruction for e in examples] == [f"Q{i}" for i in range(5)]
        assert examples[2].output == "the correct answer is true2" and examples[2].input is None
    (tmp_path / "dir").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "dir" / "x.parquet")
    _write_jsonl(tmp_path / "dir" / "y.jsonl", rows[2:])
    assert len(load_examples("commonsense170k", path=str(tmp_path / "dir"))) == 5


def test_skip_and_num_samples_are_disjoint_and_deterministic():
    held_out = load_examples("gsm8k", source="bundled", limit=100)
    train = load_examples("gsm8k_bundled_train", skip=100, num_samples=300, seed=3)
    again = load_examples("gsm8k_bundled_train", skip=100, num_samples=300, seed=3)
    other = load_examples("gsm8k_bundled_train", skip=100, num_samples=300, seed=4)
    assert train == again and train != other and len(train) == 300
    assert not {e.id for e in held_out} & {e.id for e in train}
    assert not {e.instruction for e in held_out} & {e.instruction for e in train}
    assert [e.id for e in held_out] == [f"gsm8k-{i}" for i in range(100)]


def test_commonsense_bundled_train_holds_out_the_first_rows_of_every_set():
    k = load_recipe("commonsense_bundled_train").mix.skip_per_recipe
    train = load_examples("commonsense_bundled_train")
    assert len(train) == sum(BUNDLED_COUNTS[t] - k for t in BUNDLED_COUNTS if t not in ("gsm8k", "math"))
    train_ids = {e.id for e in train}
    for task in ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"):
        held = load_examples(task, source="bundled", limit=k)
        assert not {e.id for e in held} & train_ids
        assert f"{task}-{k}" in train_ids
    assert all(e.output == f"the correct answer is {e.gold}" for e in train)


def test_missing_field_names_recipe_field_and_present_fields(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"goal": "g", "solution1": "a", "solution2": "b", "label": 0}])
    with pytest.raises(UserError) as err:
        load_examples("piqa", path=path)
    msg = str(err.value)
    assert "recipe piqa" in msg and "'sol1'" in msg and "goal, label, solution1, solution2" in msg


def test_bad_map_value_missing_file_empty_data_and_excess_skip(tmp_path):
    with pytest.raises(UserError, match="value 7 is not in the map"):
        load_examples(
            "piqa", path=_write_jsonl(tmp_path / "p.jsonl", [dict(goal="g", sol1="a", sol2="b", label=7)])
        )
    with pytest.raises(UserError, match="no such file"):
        load_examples("piqa", path=str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="has no rows"):
        load_examples("piqa", path=str(tmp_path / "empty.jsonl"))
    with pytest.raises(UserError, match="skip 5000 leaves no examples"):
        load_examples("obqa", source="bundled", skip=5000)


def test_unreachable_hub_goes_straight_to_the_bundled_copy(monkeypatch):
    """Offline without HF_HUB_OFFLINE: one quick probe, then the bundled copy; datasets is never asked (its
    retries cost ~25 s per dataset)."""
    import socket

    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    def no_hub(*args, **kwargs):
        raise AssertionError("load_dataset must not be called when the hub is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    examples = load_examples("gsm8k", limit=3)
    assert [e.id for e in examples] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
