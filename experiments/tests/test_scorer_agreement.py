"""experiments/scorer_agreement.py on small planted prediction files, verdicts decided by hand per row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import scorer_agreement as agreement


def _write(path: Path, task: str, rows: list[tuple[str, str]]) -> Path:
    lines = [
        json.dumps({"id": f"{task}-{i}", "output": out, "gold": gold}) for i, (out, gold) in enumerate(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# (output, gold, ours correct, reference correct), each decided by hand.
GSM8K = [
    ("So 9 * 2 = 18.\nThe answer is: 18", "18", True, True),
    ("The answer is: 17.6", "18", False, True),  # MetaMath rounds; a careful human does not
    ("The answer is 18", "18", True, False),  # no colon: MetaMath finds no marker
    ("The answer is: 7. Note that the answer is reasonable.", "7", True, True),
    ("The answer is: -$5", "-5", True, False),  # MetaMath's number regex skips the sign before "$"
    ("Total: 72\n#### 72", "72", True, False),
]
MATH = [
    ("The answer is: 0.5", "\\frac{1}{2}", True, True),
    ("The answer is: \\frac12.", "\\frac{1}{2}", True, True),
    ("The answer is: 2/4", "\\frac{1}{2}", True, False),  # equal, but not the same string after normalising
    ("The answer is: \\frac{1}{3}", "\\frac{1}{2}", False, False),
]
PIQA = [
    ("the correct answer is solution1", "solution1", True, True),
    ("solution1solution2", "solution1", False, True),  # two labels glued: we read no answer
    ("solution2solution2", "solution2", True, True),
    ("I think the second one", "solution2", False, False),
]


@pytest.mark.parametrize("task, rows", [("gsm8k", GSM8K), ("math", MATH), ("piqa", PIQA)])
def test_agreement_on_planted_rows(tmp_path, task, rows):
    path = _write(tmp_path / f"{task}.jsonl", task, [(o, g) for o, g, _, _ in rows])
    result = agreement.compare(path, show=-1)
    n = len(rows)
    assert (result["task"], result["n"]) == (task, n)
    assert result["ours_accuracy"] == pytest.approx(sum(r[2] for r in rows) / n)
    assert result["reference_accuracy"] == pytest.approx(sum(r[3] for r in rows) / n)
    assert result["agreement"] == pytest.approx(sum(r[2] == r[3] for r in rows) / n)
    assert [d["id"] for d in result["disagreements"]] == [
        f"{task}-{i}" for i, r in enumerate(rows) if r[2] != r[3]
    ]


def test_reference_extractions():
    assert agreement.metamath_number("The answer is: 1,234.") == 1234
    assert (
        agreement.metamath_number("The answer is: 7/2") == 4
    )  # round(3.5) in Python: banker's rounding -> 4
    assert agreement.metamath_number("no marker 5") is None
    assert agreement.hendrycks_normalise("\\left( 3, \\dfrac{1}{2} \\right)") == "(3,\\frac{1}{2})"
    assert agreement.hendrycks_normalise("x = 5") == "5"
    assert agreement.hendrycks_normalise("10^{\\circ}") == "10"
    assert agreement.llm_adapters_choice("Answer3 or answer1", "answer3", ["answer1", "answer3"]) == (
        "answer3",
        True,
    )


def test_main_prints_a_table_and_the_disagreements(tmp_path, capsys):
    path = _write(tmp_path / "predictions.jsonl", "gsm8k", [(o, g) for o, g, _, _ in GSM8K])
    (tmp_path / "metrics.json").write_text(json.dumps({"task": "gsm8k"}))
    out_json = tmp_path / "agreement.json"
    agreement.main([str(path), "--out", str(out_json)])
    text = capsys.readouterr().out
    assert "| gsm8k | 6 |" in text and "MetaMath gsm8k" in text
    assert "gsm8k-1: only reference says correct" in text
    assert json.loads(out_json.read_text())[0]["only_ours_correct"] == 3
