"""Collect the fine-tuning reproduction runs into markdown tables (experiments/repro_cpu.sh writes the runs).

Layout read under ROOT (default runs/repro):
    ROOT/<setting>/<method>/eval/<task>/metrics.json   `abba eval` summaries (method `base`: the untuned model)
    ROOT/<setting>/<method>/metrics.jsonl               training log (loss, elapsed_s per step)
    ROOT/<setting>/<method>/adapter_model.safetensors   adapter factors, or model/*.safetensors for `full`
Nothing is typed in by hand: every cell comes from these files, and a missing file shows as "-".

    python -m experiments.lm_repro_table [--root runs/repro] [--out experiments/results/lm_repro.md]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from abba_cli.analysis.compare.table import read_eval
from benchmarks import common

METHODS = ("base", "abba", "lora", "hira", "full")
LABELS = {"base": "base", "abba": "ABBA", "lora": "LoRA", "hira": "HiRA", "full": "full FT"}
TASK_ORDER = ("gsm8k", "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")
LOSS_WINDOW = 5  # the final training loss is the mean of the last few steps: one step's loss is too noisy


def read_train(run: Path) -> dict:
    """Final loss (mean of the last LOSS_WINDOW steps), first loss, steps, wall seconds of training."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return {}
    last = rows[-LOSS_WINDOW:]
    return {
        "steps": rows[-1]["step"],
        "first_loss": rows[0]["loss"],
        "final_loss": sum(r["loss"] for r in last) / len(last),
        "train_s": rows[-1]["elapsed_s"],
        "tokens": rows[-1].get("tokens"),
    }


def trainable_params(run: Path) -> int | None:
    """Parameters the run trained, counted from what it saved (adapter factors, or the whole model)."""
    from safetensors import safe_open

    files = [run / "adapter_model.safetensors"] if (run / "adapter_model.safetensors").is_file() else []
    files = files or sorted((run / "model").glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def majority_share(run: Path, task: str) -> float | None:
    """Accuracy of always answering the most common gold label of this eval slice (choice tasks only)."""
    path = run / "eval" / task / "predictions.jsonl"
    if not path.is_file():
        return None
    golds = [json.loads(line)["gold"] for line in path.read_text().splitlines() if line.strip()]
    if not golds or len(set(golds)) > 8:  # numeric answers (gsm8k): no label prior to speak of
        return None
    return max(golds.count(g) for g in set(golds)) / len(golds)


def distinct_answers(run: Path, task: str) -> int | None:
    """How many different valid answers a run gave on a task: 1 means it answers one label whatever the question."""
    path = run / "eval" / task / "predictions.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return len({r["extracted"] for r in rows if r.get("extracted") is not None})


def _cell(m: dict | None) -> str:
    if m is None:
        return "-"
    return f"{100 * m['accuracy']:.1f} ({m['invalid']})"


def setting_tables(root: Path, setting: str) -> str:
    runs = {m: root / setting / m for m in METHODS}
    evals = {m: read_eval(runs[m]) for m in METHODS}
    tasks = [t for t in TASK_ORDER if any(t in evals[m] for m in METHODS)]
    tasks += sorted({t for m in METHODS for t in evals[m]} - set(tasks))
    head = "| task | n | majority label | " + " | ".join(LABELS[m] for m in METHODS) + " |"
    lines = [
        f"#### {setting}: accuracy % (invalid answers)",
        "",
        head,
        "|---|---:|---:|" + "---:|" * len(METHODS),
    ]
    majors: list[float | None] = []
    for task in tasks:
        ns = {evals[m][task]["n"] for m in METHODS if task in evals[m]}
        n = "/".join(str(x) for x in sorted(ns))
        shares = [x for m in METHODS if (x := majority_share(runs[m], task)) is not None]
        majors.append(shares[0] if shares else None)
        major = f"{100 * shares[0]:.1f}" if shares else "-"
        cells = " | ".join(_cell(evals[m].get(task)) for m in METHODS)
        lines.append(f"| {task} | {n} | {major} | {cells} |")
    if len(tasks) > 1:
        avg = []
        for m in METHODS:
            accs = [evals[m][t]["accuracy"] for t in tasks if t in evals[m]]
            avg.append(f"{100 * sum(accs) / len(accs):.1f}" if len(accs) == len(tasks) else "-")
        major_avg = f"{100 * sum(majors) / len(majors):.1f}" if None not in majors else ""
        lines.append(f"| **average** | | {major_avg} | " + " | ".join(avg) + " |")
        # All examples pooled, with a 95% normal-approximation half-width: how far apart two methods must be
        # before the difference means anything at this n.
        pooled, ns = [], set()
        for m in METHODS:
            rows = [evals[m][t] for t in tasks if t in evals[m]]
            if len(rows) != len(tasks):
                pooled.append("-")
                continue
            n = sum(r["n"] for r in rows)
            p = sum(r["correct"] for r in rows) / n
            ns.add(n)
            pooled.append(f"{100 * p:.1f} ± {196 * math.sqrt(p * (1 - p) / n):.1f}")
        n_cell = "/".join(str(x) for x in sorted(ns))
        lines.append(f"| **pooled, 95% CI** | {n_cell} | | " + " | ".join(pooled) + " |")
    if any(t != "gsm8k" for t in tasks):
        lines += [
            "",
            f"#### {setting}: distinct valid answers given (1 = the same label for every question)",
            "",
            "| task | " + " | ".join(LABELS[m] for m in METHODS) + " |",
            "|---|" + "---:|" * len(METHODS),
        ]
        for task in tasks:
            counts = [distinct_answers(runs[m], task) for m in METHODS]
            lines.append(f"| {task} | " + " | ".join("-" if c is None else str(c) for c in counts) + " |")
    lines += [
        "",
        f"#### {setting}: training and evaluation cost",
        "",
        "| method | trainable params | steps | loss first -> final (mean of last 5) | train s | eval s |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for m in METHODS:
        tr = read_train(runs[m])
        params = 0 if m == "base" else trainable_params(runs[m])
        eval_s = sum(e["seconds"] for e in evals[m].values())
        cells = [
            LABELS[m],
            "-" if params is None else f"{params:,}",
            str(tr["steps"]) if tr else "-",
            f"{tr['first_loss']:.3f} -> {tr['final_loss']:.3f}" if tr else "-",
            f"{tr['train_s']:.0f}" if tr else "-",
            f"{eval_s:.0f}" if evals[m] else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = common.arg_parser(__doc__)
    parser.add_argument("--root", type=Path, default=Path("runs/repro"))
    parser.add_argument("--settings", nargs="+", default=["math", "commonsense"])
    parser.add_argument("--out", type=Path, default=None, help="Also write the markdown here.")
    args = parser.parse_args(argv)
    text = "\n\n".join(setting_tables(args.root, s) for s in args.settings if (args.root / s).is_dir()) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
