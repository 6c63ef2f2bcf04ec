"""Answer extraction and scoring on hand-written model outputs (no model needed)."""

from __future__ import annotations

import pytest

from abba_cli.eval.scoring import (
    Score,
    extract_choice,
    extract_math_answer,
    extract_number,
    score,
    score_choice,
    score_math,
    score_number,
    truncate_at_stop,
)

# ---------------------------------------------------------------- GSM8K (number)


@pytest.mark.parametrize(
    "output, expected",
    [
        ("She sells 1,234 clips. The answer is: 1,234", "1234"),
        ("The answer is: -3", "-3"),
        ("The answer is \u22123", "-3"),  # unicode minus
        ("The answer is: 17.6", "17.6"),
        ("The answer is: $18.", "18"),
        ("The answer is 3/4", "3/4"),
        ("The answer is: 2.50 dollars", "2.50"),
        ("The answer is: .5", ".5"),
        ("The answer is: 1 / 2", "1/2"),
        ("The answer is: +7", "+7"),
        ("The answer is 1/3", "1/3"),
        ("The answer is:\n42", "42"),
        ("48/2 = 24 clips. The answer is: 72", "72"),
        ("The answer is 2 * 1.5 = 3.\n\n", "3"),
        ("The answer is: 48 + 24 = 72 clips", "72"),
    ],
)
def test_extract_number(output, expected):
    assert extract_number(output) == expected


def test_last_answer_marker_wins():
    out = "The answer is: 5. Wait, I made a mistake. The answer is: 7"
    assert extract_number(out) == "7"
    assert score_number(out, "7") == Score("7", True)
    assert score_number(out, "5") == Score("7", False)


def test_marker_is_case_insensitive():
    assert extract_number("the ANSWER is 12") == "12"


@pytest.mark.parametrize(
    "output",
    [
        "There are 18 apples in total.",  # no marker: no fallback to the last number
        "The answer is: eighteen",
        "",
        "The answer is",
    ],
)
def test_unparseable_number_is_invalid(output):
    s = score_number(output, "18")
    assert s.extracted is None and s.invalid and not s.correct


def test_no_rounding():
    assert score_number("The answer is: 17.6", "18") == Score("17.6", False)
    assert score_number("The answer is: 18.0", "18").correct
    assert not score_number("The answer is: 17.999", "18").correct


def test_commas_and_fractions_compare_numerically():
    assert score_number("The answer is: 1,234", "1234").correct
    assert score_number("The answer is: 1234", "1,234").correct
    assert score_number("The answer is: 3/4", "0.75").correct
    assert score_number("The answer is: 0.75", "3/4").correct
    assert score_number("The answer is: -3", "-3").correct
    assert not score_number("The answer is: 3", "-3").correct
    assert not score_number("The answer is: 1000001", "1000000").correct


def test_bad_number_gold_is_loud():
    with pytest.raises(ValueError, match="not a number"):
        score_number("The answer is: 3", "three")


# ---------------------------------------------------------------- MATH (math-verify)


def test_frac_equals_decimal_gold():
    s = score_math("So we get one half. The answer is: $\\frac{1}{2}$", "0.5")
    assert s.correct and s.extracted == "$\\frac{1}{2}$"


def test_math_bare_latex_and_sentence_period():
    assert score_math("The answer is: \\frac{\\sqrt{3}}{2}.", "\\frac{\\sqrt3}{2}").correct
    assert score_math("The answer is: x^2+1", "1+x^2").correct


def test_math_boxed_fallback_and_last_marker():
    out = "We compute \\boxed{3} first, then fix it: \\boxed{\\frac{3}{4}}"
    assert extract_math_answer(out) == "\\frac{3}{4}"
    assert score_math(out, "\\frac34").correct
    assert score_math("The answer is: 2. No! The answer is: 4", "4").correct
    assert not score_math("The answer is: 2. No! The answer is: 4", "2").correct


def test_math_wrong_answer_is_valid_but_wrong():
    s = score_math("The answer is: $\\frac{1}{3}$", "0.5")
    assert s.extracted is not None and not s.correct


@pytest.mark.parametrize(
    "output", ["I do not know.", "The answer is: ", "\\boxed{unclosed", "The answer is: ???"]
)
def test_math_unparseable_is_invalid_never_correct(output):
    s = score_math(output, "0.5")
    assert s.invalid and not s.correct


def test_math_exception_counts_as_wrong(monkeypatch):
    import math_verify

    def boom(*args, **kwargs):
        raise RuntimeError("sympy blew up")

    monkeypatch.setattr(math_verify, "verify", boom)
    s = score_math("The answer is: 0.5", "0.5")
    assert s == Score(None, False)


# ---------------------------------------------------------------- commonsense (choice)


def test_choice_lowercased_first_match():
    choices = ["answer1", "answer2", "answer3", "answer4", "answer5"]
    assert extract_choice("Answer1", choices) == "answer1"
    assert score_choice("The correct answer is Answer1", "answer1", choices).correct
    assert score_choice("the correct answer is answer3, not answer1", "answer1", choices) == Score(
        "answer3", False
    )


def test_choice_no_label_is_invalid():
    s = score_choice("I think the first one.", "solution1", ["solution1", "solution2"])
    assert s.invalid and not s.correct


def test_choice_label_not_inside_longer_word():
    assert extract_choice("that is untrue; false", ["true", "false"]) == "false"
    assert extract_choice("option1.", ["option1", "option2"]) == "option1"


def test_score_dispatch():
    assert score("number", "The answer is: 4", "4").correct
    assert score("math", "The answer is: 4", "4").correct
    assert score("choice", "ending3", "ending3", ["ending1", "ending2", "ending3", "ending4"]).correct
    with pytest.raises(ValueError, match="unknown answer type"):
        score("regex", "x", "x")


def test_truncate_at_first_stop_string():
    text = "The answer is: 4\n\n### Instruction:\nmore"
    assert truncate_at_stop(text, ["### Instruction", "\n\n\n"]) == "The answer is: 4\n\n"
    assert truncate_at_stop("abc", ["zz", ""]) == "abc"
    assert truncate_at_stop("a</s>b###c", ["###", "</s>"]) == "a"


# ---------------------------------------------------------------- answer extraction: the references' defects


def test_later_marker_without_an_answer_is_ignored():
    out = "The answer is: 7. Note that the answer is reasonable."
    assert score_number(out, "7") == Score("7", True)
    assert score_math(out, "7") == Score("7", True)


def test_metamath_marker_is_preferred_to_a_later_bare_one():
    # "The answer is:" is the trained format; a later bare "the answer is" with a number is prose.
    out = "The answer is: 12\nWe can check: the answer is 3 times 4."
    assert extract_number(out) == "12"


@pytest.mark.parametrize(
    "output, expected",
    [
        ("The answer is: 5, since x = 3", "5"),
        ("The answer is: 5 because 2 + 3 = 5", "5"),
        ("The answer is: 40; she keeps the rest", "40"),
        ("The answer is: -$5", "-5"),
        ("The answer is: -\\$5.50", "-5.50"),
        ("The answer is: $1,200 in total", "1200"),
        ("The answer is: €30", "30"),
    ],
)
def test_justification_and_currency_on_the_answer_line(output, expected):
    assert extract_number(output) == expected


def test_justification_on_a_math_answer_line():
    assert score_math("The answer is: 5, since x = 3", "5") == Score("5", True)
    assert score_math("The answer is: $x=4$ because the sum is 8.", "x=4").correct


@pytest.mark.parametrize(
    "output",
    [
        "Natalia sold 48 + 24 = 72 clips.\n#### 72",
        "#### 72",
        "She has 72 clips.\n#### 72\n\nI hope this helps",
    ],
)
def test_gsm8k_hash_format_is_read(output):
    assert score_number(output, "72") == Score("72", True)


def test_marker_beats_hash_format():
    assert extract_number("#### 5\nThe answer is: 6") == "6"


@pytest.mark.parametrize(
    "output, gold, extracted",
    [
        ("The answer is: \\$18.90", "\\$18.90", "\\$18.90"),
        ("The answer is: $18.90", "\\$18.90", "$18.90"),
        ("The answer is: 18.90", "\\$18.90", "18.90"),
        ("The answer is: \\$40", "40", "\\$40"),
        ("The answer is: $\\$40$.", "40", "$\\$40$"),
    ],
)
def test_escaped_dollar_is_a_dollar_sign_not_math(output, gold, extracted):
    assert score_math(output, gold) == Score(extracted, True)


def test_dollar_answer_can_still_be_wrong():
    s = score_math("The answer is: \\$41", "\\$18.90")
    assert s.extracted == "\\$41" and not s.correct


def test_math_thousands_separator_inside_a_fraction():
    assert score_math("The answer is: \\frac{12}{5,\\!525}", "\\frac{12}{5,\\!525}").correct
    assert score_math("The answer is: \\frac{12}{5525}", "\\frac{12}{5,\\!525}").correct
    assert not score_math("The answer is: \\frac{12}{5524}", "\\frac{12}{5,\\!525}").correct


def test_gold_with_a_trailing_period():
    assert score_math(
        "The answer is: \\frac{7}{5} + \\frac{1}{5} i", "\\frac{7}{5} + \\frac{1}{5} i."
    ).correct


def test_multiline_matrix_answer_is_read_whole():
    out = "The answer is: \\begin{pmatrix} 6 \\\\\n 3 \\\\\n 0 \\end{pmatrix}\n\nDone."
    assert score_math(out, "\\begin{pmatrix} 6 \\\\ 3 \\\\ 0 \\end{pmatrix}").correct
    assert not score_math(out, "\\begin{pmatrix} 6 \\\\ 3 \\\\ 1 \\end{pmatrix}").correct


@pytest.mark.parametrize(
    "output, choices, expected",
    [
        ("solution1solution1solution1", ["solution1", "solution2"], "solution1"),
        ("answer2answer2", ["answer1", "answer2", "answer3"], "answer2"),
        ("the correct answer is ending4ending4.", ["ending1", "ending2", "ending3", "ending4"], "ending4"),
        ("TrueTrue", ["true", "false"], "true"),
        # Two different labels glued together state no answer (the references would read the first).
        ("solution1solution2", ["solution1", "solution2"], None),
        ("answer1answer2 answer3", ["answer1", "answer2", "answer3"], "answer3"),
    ],
)
def test_glued_repeated_labels(output, choices, expected):
    assert extract_choice(output, choices) == expected
