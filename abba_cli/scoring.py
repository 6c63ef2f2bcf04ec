"""Answer extraction and scoring for evaluation outputs: pure functions, no torch.

Protocol (docs/ARCHITECTURE section 4, fixing the references' bugs):
- number (GSM8K): the number after the LAST "The answer is", commas removed, compared numerically with a tight
  tolerance and no rounding (17.6 is not 18). No marker or no number there: invalid, never correct.
- math (MATH): math-verify parses the answer after the last "The answer is" (else the last \\boxed{...}) and
  checks it against the gold LaTeX. Any parse/verify failure is wrong and invalid, never correct (the released
  ABBA scorer counted exceptions as correct).
- choice (commonsense): the first answer label (e.g. solution1/solution2) found in the lowercased output.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

ANSWER_TYPES = ("number", "math", "choice")

_MARKER = re.compile(r"the answer is", re.IGNORECASE)
# A number as models write it: optional sign, thousands separators, decimals, or a simple fraction.
# Thousands groups must be exactly 3 digits so "1,2" is not read as 12.
_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_NUMBER = re.compile(rf"(?P<num>{_NUM})(?:\s*/\s*(?P<den>{_NUM}))?")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-"})


@dataclass(frozen=True)
class Score:
    """What was read from one output: `extracted` is None when nothing usable was found (invalid)."""

    extracted: str | None
    correct: bool

    @property
    def invalid(self) -> bool:
        return self.extracted is None


def _after_last_marker(text: str) -> str | None:
    """The first non-empty line after the last "The answer is", without a leading colon; None if no marker."""
    matches = list(_MARKER.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].lstrip(" \t:\n")
    return rest.split("\n", 1)[0].strip()


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


def extract_number(output: str) -> str | None:
    """The number after the last "The answer is", minus commas/spaces ("1,234" -> "1234"); None if absent."""
    rest = _after_last_marker(output)
    if rest is None:
        return None
    # "The answer is 2 * 1.5 = 3": the answer is the result of the equation, not its first operand.
    rest = rest.rsplit("=", 1)[-1]
    m = _NUMBER.search(rest.translate(_MINUS_SIGNS))
    if m is None or _to_fraction(m.group(0)) is None:  # e.g. a zero denominator
        return None
    return re.sub(r"[,\s]", "", m.group(0))


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


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent or unclosed."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    start = starts[-1]
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_math_answer(output: str) -> str | None:
    """The raw answer text: after the last "The answer is", else the last \\boxed{}; None if neither."""
    rest = _after_last_marker(output)
    if rest:
        # A sentence-final period is punctuation, not part of the answer ("... is: $\frac{1}{2}$.").
        return rest.rstrip(" .")
    return _last_boxed(output)


def _as_latex(text: str) -> str:
    """math-verify finds LaTeX inside math delimiters; bare answers like x^2+1 need them to parse."""
    if "$" in text or "\\(" in text or "\\[" in text or "\\boxed" in text:
        return text
    return f"${text}$"


def _math_verify_timeout() -> int | None:
    # math-verify times out with SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


def score_math(output: str, gold: str) -> Score:
    """math-verify on the extracted answer; any exception or unparseable answer is invalid and wrong."""
    from math_verify import parse, verify

    raw = extract_math_answer(output)
    if not raw:
        return Score(None, False)
    timeout = _math_verify_timeout()
    try:
        # no_fallback: an answer math-verify cannot read stays unread instead of becoming a raw string.
        predicted = parse(_as_latex(raw), fallback_mode="no_fallback", parsing_timeout=timeout)
        if not predicted:
            return Score(None, False)
        expected = parse(_as_latex(str(gold)), parsing_timeout=timeout) or [str(gold)]
        correct = bool(verify(expected, predicted, timeout_seconds=timeout))
    except Exception:  # math-verify/sympy failures: counted as invalid, never correct
        return Score(None, False)
    return Score(raw, correct)


def choice_pattern(choices: Sequence[str]) -> re.Pattern[str]:
    """Alternation of the labels, longest first, not inside a longer word ("true" does not match "untrue")."""
    labels = sorted({c.lower() for c in choices}, key=len, reverse=True)
    alternation = "|".join(re.escape(label) for label in labels)
    return re.compile(rf"(?<![a-z0-9])(?:{alternation})(?![a-z0-9])")


def extract_choice(output: str, choices: Sequence[str]) -> str | None:
    """The first answer label in the lowercased output, or None."""
    if not choices:
        raise ValueError("a choice task needs its answer labels (recipe answer.choices)")
    m = choice_pattern(choices).search(output.lower())
    return None if m is None else m.group(0)


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
