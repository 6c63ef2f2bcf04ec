"""How often does our scorer agree with the references' on real predictions?

Re-scores every row of one or more `abba eval` predictions.jsonl files twice, from the stored `output` and
`gold` only: with our scorer (abba_cli.eval.scoring, as it is now) and with a re-implementation of the scorer the
papers' numbers came from:
- GSM8K, MetaMath's eval_gsm8k.py (the ABBA authors' gsm8k_eval.py is the same): the first number after the
  last "The answer is: ", ROUNDED to an integer, compared with the gold as floats.
- MATH, MetaMath's eval_math.py: the text after the last "The answer is: " up to ".\\n", a final "." dropped,
  compared with the gold after Hendrycks' MATH string normalisation (is_equiv / strip_string).
- commonsense, LLM-Adapters' commonsense_evaluate.py (and ABBA's): the first match of the task's labels in
  the stripped, lowercased output, no word boundaries.
It prints, per file, both accuracies, the agreement rate and the disagreeing rows (which side said correct,
what each extracted). Where they disagree, README "Evaluation" says which verdict we keep and why.

    python -m experiments.scorer_agreement RUN_DIR/eval/gsm8k/predictions.jsonl [...] [--show 20] [--out x.json]
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from abba_cli.data.recipes import load_recipe
from abba_cli.eval.scoring import score
from benchmarks import common

METAMATH_MARKER = "The answer is: "


# --------------------------------------------------------------------------------------- MetaMath, GSM8K


def metamath_number(completion: str) -> int | None:
    """The integer MetaMath's extract_answer_number reads (it rounds: 17.6 -> 18), or None (invalid)."""
    parts = completion.split(METAMATH_MARKER)
    if len(parts) < 2:
        return None
    m = re.search(r"[\-+]?\d*[\.,/]?\d+", parts[-1].strip())
    if m is None:
        return None
    text = m.group().replace(",", "")
    if "/" in text:
        num, den = text.split("/")
        if not num.lstrip("+-") or not den:
            return None
        if float(den) == 0:
            return round(float(num))  # their quirk: n/0 reads as n
        return round(float(Fraction(text)))
    value = float(text)
    return None if value == float("inf") else round(value)


def metamath_gsm8k(output: str, gold: str) -> tuple[Any, bool]:
    predicted = metamath_number(output)
    return predicted, predicted is not None and float(predicted) == float(str(gold).replace(",", ""))


# --------------------------------------------------------------------------------------- MetaMath, MATH


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2} (Hendrycks' _fix_fracs; an empty tail raises, as there)."""
    head, *rest = s.split("\\frac")
    out = head
    for sub in rest:
        out += "\\frac"
        if sub[0] == "{":
            out += sub
        elif len(sub) < 2:
            return s
        else:
            a, b, tail = sub[0], sub[1], sub[2:]
            out += "{" + a + "}" + ("{" + b + "}" if b != "{" else b) + tail
    return out


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2 or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        return s
    return f"\\frac{{{int(parts[0])}}}{{{int(parts[1])}}}"


def _fix_sqrt(s: str) -> str:
    head, *rest = s.split("\\sqrt")
    return head + "".join("\\sqrt" + (p if p[0] == "{" else "{" + p[0] + "}" + p[1:]) for p in rest)


def hendrycks_normalise(s: str) -> str:
    """Hendrycks' MATH strip_string, as MetaMath's util.is_equiv applies it (our own re-implementation)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in s:  # units on the right: "5 \\text{ cm}" -> "5" (more than one raises, as there)
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("several \\text{ } units")
        s = parts[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 5" -> "5"
        s = sides[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def metamath_math(output: str, gold: str) -> tuple[Any, bool]:
    parts = output.split(METAMATH_MARKER)
    if len(parts) < 2:
        return None, False
    answer = parts[-1].split(".\n")[0].strip()
    if answer.endswith("."):
        answer = answer[:-1].strip()
    try:
        return answer, hendrycks_normalise(answer) == hendrycks_normalise(str(gold))
    except Exception:  # noqa: BLE001 - their is_equiv falls back to plain string equality
        return answer, answer == str(gold)


# --------------------------------------------------------------------------------------- LLM-Adapters


def llm_adapters_choice(output: str, gold: str, labels: list[str]) -> tuple[Any, bool]:
    """The first of the labels anywhere in the stripped, lowercased output (re.findall(...)[0])."""
    found = re.findall("|".join(labels), output.strip().lower())
    predicted = found[0] if found else None
    return predicted, predicted == str(gold).strip().lower()


# --------------------------------------------------------------------------------------- comparison


def reference_scorer(task: str):
    """(name, fn(output, gold) -> (extracted, correct)) of the reference scorer for a task's answer type."""
    recipe = load_recipe(task)
    kind = recipe.answer.type
    if kind == "number":
        return "MetaMath gsm8k", metamath_gsm8k
    if kind == "math":
        return "MetaMath math", metamath_math
    labels = list(recipe.answer.labels)
    return "LLM-Adapters", lambda output, gold: llm_adapters_choice(output, gold, labels)


def task_of(path: Path, rows: list[dict]) -> str:
    """The task: from metrics.json next to the file, else from the ids ("gsm8k-12" -> gsm8k)."""
    metrics = path.with_name("metrics.json")
    if metrics.is_file():
        return json.loads(metrics.read_text())["task"]
    return rows[0]["id"].rsplit("-", 1)[0]


def compare(path: Path, show: int = 10) -> dict[str, Any]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    task = task_of(path, rows)
    recipe = load_recipe(task)
    name, reference = reference_scorer(task)
    labels = list(recipe.answer.labels or [])
    ours_ok = ref_ok = agree = 0
    disagreements = []
    for r in rows:
        ours = score(recipe.answer.type, r["output"], r["gold"], labels)
        ref_extracted, ref_correct = reference(r["output"], r["gold"])
        ours_ok += ours.correct
        ref_ok += ref_correct
        if ours.correct == ref_correct:
            agree += 1
        else:
            disagreements.append(
                {
                    "id": r["id"],
                    "gold": r["gold"],
                    "ours": ours.extracted,
                    "ours_correct": ours.correct,
                    "reference": None if ref_extracted is None else str(ref_extracted),
                    "reference_correct": ref_correct,
                    "output_tail": r["output"][-160:],
                }
            )
    n = len(rows)
    return {
        "file": str(path),
        "task": task,
        "reference": name,
        "n": n,
        "ours_accuracy": ours_ok / n if n else 0.0,
        "reference_accuracy": ref_ok / n if n else 0.0,
        "agreement": agree / n if n else 1.0,
        "only_ours_correct": sum(d["ours_correct"] for d in disagreements),
        "only_reference_correct": sum(d["reference_correct"] for d in disagreements),
        "disagreements": disagreements if show < 0 else disagreements[:show],
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = common.arg_parser(__doc__)
    p.add_argument("predictions", nargs="+", type=Path, help="predictions.jsonl files written by `abba eval`")
    p.add_argument("--show", type=int, default=10, help="disagreeing rows to print per file (-1: all)")
    p.add_argument("--out", type=Path, help="also write the results as JSON")
    args = p.parse_args(argv)
    results = [compare(path, args.show) for path in args.predictions]
    headers = ["task", "n", "ours", "reference", "ref acc", "agreement", "only ours", "only ref"]
    table = [
        [
            r["task"],
            r["n"],
            f"{100 * r['ours_accuracy']:.2f}%",
            r["reference"],
            f"{100 * r['reference_accuracy']:.2f}%",
            f"{100 * r['agreement']:.2f}%",
            r["only_ours_correct"],
            r["only_reference_correct"],
        ]
        for r in results
    ]
    print(common.md_table(headers, table))
    for r in results:
        for d in r["disagreements"]:
            side = "ours" if d["ours_correct"] else "reference"
            print(
                f"\n{r['task']} {d['id']}: only {side} says correct; gold {d['gold']!r}, "
                f"ours {d['ours']!r}, reference {d['reference']!r}\n    ...{d['output_tail']!r}"
            )
    if args.out:
        common.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
