"""Answer extraction and scoring for evaluation outputs: pure functions, no torch.

Protocol (docs/ARCHITECTURE section 4 and README "Evaluation", fixing the references' bugs):
- Where the answer is (GSM8K and MATH): the LAST `The answer is:` (the MetaMath marker) that carries a value;
  else the last bare `the answer is` that carries one; else the last `#### N` (GSM8K's own format); else (MATH)
  the last \\boxed{}. A later marker with no answer after it ("Note that the answer is reasonable.") is
  ignored, and a justification on the answer line ("5, since x = 3") is cut off.
- number (GSM8K): commas, currency signs ("-$5" is -5) and units dropped, compared numerically with a tight
  tolerance and no rounding (17.6 is not 18, unlike the references). No answer found: invalid, never correct.
- math (MATH): math-verify parses the answer and checks it against the gold LaTeX. `\\$` is a dollar sign, not
  a math delimiter. Any parse/verify failure is wrong and invalid, never correct (the released ABBA scorer
  counted exceptions as correct).
- choice (commonsense): the first answer label (e.g. solution1/solution2) in the lowercased output, also when
  the model glues repeats of it together ("solution1solution1").
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

from abba_cli.data.latex import last_boxed

ANSWER_TYPES = ("number", "math", "choice")

# Markers in priority order; within one, the last occurrence that carries a value wins.
_MARKERS = (
    re.compile(r"the answer is\s*:", re.IGNORECASE),  # MetaMath's "The answer is: X" (the training target)
    re.compile(r"the answer is(?!\s*:)", re.IGNORECASE),
    re.compile(r"####"),  # GSM8K's reference solutions end with "#### 18"
)
# A number as models write it: optional sign, thousands separators, decimals, or a simple fraction.
# Thousands groups must be exactly 3 digits so "1,2" is not read as 12.
_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_NUMBER = re.compile(rf"(?P<num>{_NUM})(?:\s*/\s*(?P<den>{_NUM}))?")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-"})
_CURRENCY = re.compile(r"\\?\$|[\u20ac\u00a3\u00a5]")
# Where a justification starts on the answer line: "5, since x = 3", "7. Note that ...", "4 because ...".
_JUSTIFICATION_WORDS = r"since|because|as|which|so|given|where|when|from|after|if"
_NUMBER_JUSTIFICATION = re.compile(rf"[,;]\s+(?=[a-zA-Z])|\s+(?:{_JUSTIFICATION_WORDS})\b|\.\s")
_MATH_JUSTIFICATION = re.compile(rf",?\s+(?:{_JUSTIFICATION_WORDS})\s|\.\s+(?=[A-Z])")


@dataclass(frozen=True)
class Score:
    """What was read from one output: `extracted` is None when nothing usable was found (invalid)."""

    extracted: str | None
    correct: bool

    @property
    def invalid(self) -> bool:
        return self.extracted is None


def _value_after(text: str, end: int) -> str:
    """The answer text after a marker: its first non-empty line, extended while braces or environments
    opened on it are still open (a matrix or a \\text{...} may span lines)."""
    lines = text[end:].lstrip(" \t:\n").split("\n")
    value = lines[0]
    for more in lines[1:]:
        if value.count("{") <= value.count("}") and value.count("\\begin{") <= value.count("\\end{"):
            break
        value += "\n" + more
    return value.strip()


def answer_candidates(text: str) -> Iterator[str]:
    """The non-empty answer texts after each marker, most trusted first (see the module docstring)."""
    for marker in _MARKERS:
        for m in reversed(list(marker.finditer(text))):
            value = _value_after(text, m.end())
            if value:
                yield value


def _to_fraction(text: str) -> Fraction | None:
    """Parse a number string (commas, sign, decimal, a/b) exactly; None if it is not one."""
    m = _NUMBER.fullmatch(text.strip().translate(_MINUS_SIGNS))
    if m is None:
        return None
    value = Fraction(m["num"].replace(",", ""))
    if m["den"] is not None:
        den = Fraction(m["den"].replace(",", ""))
        if den == 0:
            return None
        value /= den
    return value


def _number_in(value: str) -> str | None:
    """The number an answer text states, minus commas/spaces ("1,234" -> "1234"); None if there is none."""
    value = _NUMBER_JUSTIFICATION.split(value, maxsplit=1)[0]
    # "The answer is 2 * 1.5 = 3": the answer is the result of the equation, not its first operand.
    value = value.rsplit("=", 1)[-1]
    value = _CURRENCY.sub("", value).translate(_MINUS_SIGNS)  # "-$5" -> "-5"
    m = _NUMBER.search(value)
    if m is None or _to_fraction(m.group(0)) is None:  # e.g. a zero denominator
        return None
    return re.sub(r"[,\s]", "", m.group(0))


def extract_number(output: str) -> str | None:
    """The number of the most trusted answer marker that states one (see the module docstring); else None."""
    for value in answer_candidates(output):
        number = _number_in(value)
        if number is not None:
            return number
    return None


def numbers_equal(a: Fraction, b: Fraction) -> bool:
    """Numerically equal up to float noise only: 17.6 != 18, 0.1 + 0.2 == 0.3."""
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)


def score_number(output: str, gold: str) -> Score:
    gold_value = _to_fraction(str(gold))
    if gold_value is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    extracted = extract_number(output)
    if extracted is None:
        return Score(None, False)
    return Score(extracted, numbers_equal(_to_fraction(extracted), gold_value))


def _math_value(value: str) -> str:
    """An answer text without a trailing justification or sentence-final period."""
    value = _MATH_JUSTIFICATION.split(value, maxsplit=1)[0]
    return value.strip().rstrip(" .").strip()


def extract_math_answer(output: str) -> str | None:
    """The raw answer text of the most trusted marker, else the last \\boxed{}; None if neither."""
    for value in answer_candidates(output):
        value = _math_value(value)
        if value:
            return value
    return last_boxed(output)


def _strip_dollar_signs(text: str) -> str:
    """`\\$18.90` is a dollar amount, not math: drop escaped dollars, and a lone `$` that opens no math."""
    text = text.replace("\\$", "")
    if text.count("$") % 2 == 1:
        text = text.replace("$", "")
    return text


def _as_latex(text: str) -> str:
    """math-verify finds LaTeX inside math delimiters; bare answers like x^2+1 need them to parse."""
    text = _strip_dollar_signs(text).replace("\n", " ")  # math-verify reads a matrix on one line only
    # "5,\\!525" and "5{,}525" are LaTeX thousands separators, which math-verify does not read inside a \\frac.
    text = re.sub(r"(?<=\d)(?:,\\!|\{,\})(?=\d{3})", "", text)
    if "$" in text or "\\(" in text or "\\[" in text or "\\boxed" in text:
        return text
    return f"${text}$"


def _math_verify_timeout() -> int | None:
    # math-verify times out with SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse_math(text: str, timeout: int | None, fallback: bool = False) -> list:
    from math_verify import parse

    # no_fallback: an answer math-verify cannot read stays unread instead of becoming a raw string.
    mode = "first_match" if fallback else "no_fallback"
    return parse(_as_latex(text), fallback_mode=mode, parsing_timeout=timeout)


def score_math(output: str, gold: str) -> Score:
    """math-verify on the extracted answer; any exception or unparseable answer is invalid and wrong."""
    from math_verify import verify

    raw = extract_math_answer(output)
    if not raw:
        return Score(None, False)
    timeout = _math_verify_timeout()
    try:
        predicted = _parse_math(raw, timeout)
        if not predicted:
            return Score(None, False)
        gold = str(gold).strip().rstrip(" .")  # a few MATH golds end with a period ("\\frac{1}{5} i.")
        expected = _parse_math(gold, timeout, fallback=True) or [gold]
        correct = bool(verify(expected, predicted, timeout_seconds=timeout))
    except Exception:  # math-verify/sympy failures: counted as invalid, never correct
        return Score(None, False)
    return Score(raw, correct)


def choice_pattern(choices: Sequence[str]) -> re.Pattern[str]:
    """A label, longest first, not inside a longer word ("true" does not match "untrue"), possibly repeated
    without spaces ("solution1solution1": both references read it, and so does a human). Two different labels
    glued together ("solution1solution2") say nothing and are not read."""
    labels = sorted({c.lower() for c in choices}, key=len, reverse=True)
    alternation = "|".join(re.escape(label) for label in labels)
    return re.compile(rf"(?<![a-z0-9])(?P<label>{alternation})(?:(?P=label))*(?![a-z0-9])")


def extract_choice(output: str, choices: Sequence[str]) -> str | None:
    """The first answer label in the lowercased output, or None."""
    if not choices:
        raise ValueError("a choice task needs its answer labels (recipe answer.choices)")
    m = choice_pattern(choices).search(output.lower())
    return None if m is None else m["label"]


def score_choice(output: str, gold: str, choices: Sequence[str]) -> Score:
    extracted = extract_choice(output, choices)
    return Score(extracted, extracted is not None and extracted == str(gold).strip().lower())


def score(answer_type: str, output: str, gold: str, choices: Sequence[str] | None = None) -> Score:
    """Dispatch on a recipe's answer type: number | math | choice."""
    if answer_type == "number":
        return score_number(output, gold)
    if answer_type == "math":
        return score_math(output, gold)
    if answer_type == "choice":
        return score_choice(output, gold, choices or [])
    raise ValueError(f"unknown answer type {answer_type!r}; valid: {', '.join(ANSWER_TYPES)}")


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut generated text at the first occurrence of any stop string (generation may overshoot by a token)."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]
