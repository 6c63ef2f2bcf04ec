"""MATH golds: the last \\boxed{} of the reference solution, and a model that answers exactly the
reference answer is scored correct."""

from __future__ import annotations

import json

import pytest

from abba_cli.data.latex import last_boxed
from abba_cli.data.recipes import load_examples
from abba_cli.eval.scoring import score_math

# Solutions written like the MATH ones whose Minerva-normalised `answer` field is broken in the bundled copy.
PLANTED = [
    ("so the range is $\\boxed{[0,\\infty)}$.", "[0,\\iny)", "[0,\\infty)"),
    (
        "$x \\in \\boxed{\\left(-\\infty,-\\frac 12\\right)\\cup \\left(-\\frac 12,\\infty\\right)}$",
        "\\le(-\\iny,-\\frac{1}{2}\\right)\\cup\\le(-\\frac{1}{2},\\iny\\right)",
        "\\left(-\\infty,-\\frac 12\\right)\\cup \\left(-\\frac 12,\\infty\\right)",
    ),
    ("Thus, the only solution is $\\boxed{4,6,14,15}$.", "461415", "4,6,14,15"),
    (
        "is $\\boxed{\\begin{pmatrix} 6 \\\\ 3 \\\\ 0 \\end{pmatrix}}.$",
        "\\begin{pmatrix}6\\3\\0\\end{pmatrix}",
        "\\begin{pmatrix} 6 \\\\ 3 \\\\ 0 \\end{pmatrix}",
    ),
    ("she pays $\\boxed{\\$18.90}$ in all.", "18.90", "\\$18.90"),
    ("first $\\boxed{2}$, finally $\\fbox{\\frac{3}{4}}$", "2", "\\frac{3}{4}"),
    ("hence the answer is $\\boxed 5$.", "55", "5"),
]


@pytest.mark.parametrize(
    "text, expected", [(s, g) for s, _, g in PLANTED] + [("no box", None), ("\\boxed{1", None)]
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_planted_problematic_golds_come_from_the_solution_and_score(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text(
        "".join(
            json.dumps({"problem": f"p{i}", "solution": s, "answer": a}) + "\n"
            for i, (s, a, _) in enumerate(PLANTED)
        )
    )
    examples = load_examples("math", path=str(path))
    assert [e.gold for e in examples] == [g for _, _, g in PLANTED]
    for e in examples:
        assert score_math(f"The answer is: {e.gold}", e.gold).correct, e.gold
    # The broken normalised field would not have been accepted as the answer of the real solution.
    assert not score_math("The answer is: 461415", "4,6,14,15").correct


def test_bundled_copy_golds_of_known_broken_rows():
    by_id = {e.id: e.gold for e in load_examples("math", source="bundled", limit=60)}
    assert by_id["math-8"] == "4,6,14,15"
    assert by_id["math-25"] == "[0,\\infty)"
    assert by_id["math-56"].startswith("\\left(-\\infty")


@pytest.mark.slow
def test_a_model_answering_each_reference_answer_is_correct_on_all_5000():
    examples = load_examples("math", source="bundled")
    assert len(examples) == 5000
    wrong = [e.id for e in examples if not score_math(f"The answer is: {e.gold}", e.gold).correct]
    assert wrong == []
    # And the check can fail: the neighbouring problem's answer is almost never accepted.
    shifted = sum(
        score_math(f"The answer is: {examples[i - 1].gold}", examples[i].gold).correct
        for i in range(0, 5000, 25)
    )
    assert shifted < 10
