"""The comparison's table (markdown + JSON) and loss curves (PNG), every cell read from the run files.

Per method, over its finished seeds: final and best validation loss (mean ± sample sd), accuracy per task and
pooled over tasks and seeds with a 95% Wilson interval, training time per optimizer step and peak memory.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abba_cli.analysis.compare.folder import CURVES, RESOURCES, SUMMARY, TABLE, run_dir, run_name
from abba_cli.eval.results import read_predictions, read_task_metrics, run_eval_dir
from abba_cli.run.layout import has_final_output, read_metrics_records
from abba_cli.util.files import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from abba_cli.analysis.compare.budget import MethodPlan

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


def val_curve(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_metrics_records(run) if "val_loss" in r]


def read_eval(run: Path) -> dict[str, dict]:
    """{task: its metrics.json} of a run's finished evaluation tasks."""
    return read_task_metrics(run_eval_dir(run))


def wilson(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (stays inside [0, 1], sound for small n and p near 0 or 1)."""
    p, z2 = correct / n, Z95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_sd(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    sd = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.mean(values), "sd": sd, "n": len(values), "values": values}


def majority_share(run: Path, task: str) -> float | None:
    """Accuracy of always giving the most common gold label of the slice (choice tasks only)."""
    rows = read_predictions(run_eval_dir(run), task)
    if rows is None:
        return None
    golds = [row.get("gold") for row in rows]
    if not golds or len(set(golds)) > 8:  # numeric answers: no label prior to speak of
        return None
    return max(golds.count(g) for g in set(golds)) / len(golds)


def method_summary(runs: list[Path], tasks: list[str]) -> dict[str, Any]:
    """One method's cells over its finished runs (`tasks`: the eval tasks every run must have to count)."""
    curves = [c for c in (val_curve(r) for r in runs) if c]
    evals = [e for e in (read_eval(r) for r in runs) if all(t in e for t in tasks)]
    per_task = {}
    for t in tasks:
        c, n = sum(e[t]["correct"] for e in evals), sum(e[t]["n"] for e in evals)
        per_task[t] = {
            "correct": c,
            "n": n,
            "accuracy": c / n if n else None,
            "per_seed": [e[t]["correct"] / e[t]["n"] for e in evals],
        }
    c, n = sum(v["correct"] for v in per_task.values()), sum(v["n"] for v in per_task.values())
    pooled = {
        "correct": c,
        "n": n,
        "invalid": sum(e[t].get("invalid", 0) for e in evals for t in tasks),
        "accuracy": c / n if n else None,
        "ci95": list(wilson(c, n)) if n else None,
        "per_seed": [sum(e[t]["correct"] for t in tasks) / sum(e[t]["n"] for t in tasks) for e in evals],
    }
    per_step, memory, kinds = [], [], set()
    for r in runs:
        rows = read_metrics_records(r)
        if rows:
            per_step.append(rows[-1]["elapsed_s"] / rows[-1]["step"])
        res = r / RESOURCES
        if res.is_file():
            data = json.loads(res.read_text())
            if data.get("peak_memory_bytes") is not None:
                memory.append(data["peak_memory_bytes"])
                kinds.add(data["memory_kind"])
    return {
        "runs": [r.name for r in runs],
        "final_val_loss": mean_sd([c[-1][1] for c in curves]),
        "best_val_loss": mean_sd([min(v for _, v in c) for c in curves]),
        "accuracy": {"pooled": pooled, "per_task": per_task, "evaluated_runs": len(evals)},
        "seconds_per_step": mean_sd(per_step),
        "peak_memory_bytes": max(memory) if memory else None,
        "memory_kind": "/".join(sorted(kinds)) or None,
    }


def summarize(out: Path, config: Path, plans: list[MethodPlan], seeds: int) -> dict[str, Any]:

    methods = {}
    for plan in plans:
        runs = [run_dir(out, run_name(plan.row, s)) for s in range(1, seeds + 1)]
        done = [r for r in runs if has_final_output(r)]  # a run still training would mix a partial curve in
        methods[plan.row] = {
            "label": plan.label,
            "method": plan.method,
            "adapter": plan.describe,
            "trainable_params": plan.trainable,
            **method_summary(done, plan.cfg.eval.tasks),
        }
    ref = next(
        (
            run_dir(out, r)
            for m in methods.values()
            for r in m["runs"]
            if run_eval_dir(run_dir(out, r)).is_dir()
        ),
        None,
    )
    tasks = plans[0].cfg.eval.tasks
    majority = {t: majority_share(ref, t) if ref else None for t in tasks}
    return {
        "config": str(config),
        "seeds": seeds,
        "tasks": tasks,
        "majority_label": majority,
        "methods": methods,
    }


def _ms(cell: dict | None, digits: int = 4) -> str:
    if cell is None:
        return "-"
    if cell["sd"] is None:
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {cell['sd']:.{digits}f}"


def _memory(m: dict) -> str:
    b = m["peak_memory_bytes"]
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB ({'GPU' if m['memory_kind'] == 'cuda_max_allocated' else 'RSS'})"


def paper_layout(summary: dict, paper: dict | None = None) -> list[str]:
    """Rows and columns as the paper prints them: one row per method (and sweep cell), its trainable
    parameters, accuracy per task (mean over seeds, %) and the average over tasks; the paper's figure beside
    ours in brackets where `paper` (compare.paper_figures) has it."""
    from abba_cli.analysis.compare.paper_figures import paper_cell

    tasks = summary["tasks"]
    lines = [
        "| method | params | " + " | ".join(tasks) + " | Avg |",
        "|---|---:|" + "---:|" * (len(tasks) + 1),
    ]
    for row, m in summary["methods"].items():
        per_task = m["accuracy"]["per_task"]
        cells = []
        for t in tasks:
            acc = per_task[t]["accuracy"]
            cells.append(_with_paper(None if acc is None else 100 * acc, paper_cell(paper, row, t)))
        accs = [per_task[t]["accuracy"] for t in tasks]
        avg = 100 * sum(accs) / len(accs) if accs and None not in accs else None
        cells.append(_with_paper(avg, paper_cell(paper, row, "avg")))
        params = f"{m['trainable_params'] / 1e6:.3f}M"
        theirs = (paper or {}).get("trainable_params", {}).get(row)
        if theirs is not None:
            params += f" (paper {theirs / 1e6:.2f}M)"
        lines.append(f"| {m.get('label', row)} | {params} | " + " | ".join(cells) + " |")
    if paper is not None:
        lines += ["", f"In brackets: {paper['title']}; source: {paper['source']}."]
    return lines


def _with_paper(ours: float | None, theirs: float | None) -> str:
    cell = "-" if ours is None else f"{ours:.1f}"
    return cell if theirs is None else f"{cell} (paper {theirs:.2f})"


def to_markdown(summary: dict, paper: dict | None = None) -> str:
    lines = [
        f"`abba compare {summary['config']}`: {summary['seeds']} seed(s) per method (seed k: train.seed = "
        "data.seed = k); loss: mean ± sample sd over seeds; accuracy: every question of every task and seed.",
        "",
        "| method | adapter | trainable | seeds | final val_loss | best val_loss | accuracy, pooled [95% Wilson CI] | "
        "per seed | invalid | s / step | peak memory |",
        "|---|---|---:|---:|---|---|---|---|---:|---:|---:|",
    ]
    for name, m in summary["methods"].items():
        p = m["accuracy"]["pooled"]
        acc = (
            f"{100 * p['accuracy']:.1f}% [{100 * p['ci95'][0]:.1f}, {100 * p['ci95'][1]:.1f}] (n={p['n']})"
            if p["n"]
            else "-"
        )
        seeds = ", ".join(f"{100 * a:.1f}" for a in p["per_seed"]) or "-"
        lines.append(
            f"| {m.get('label', name)} | {m['adapter']} | {m['trainable_params']:,} | {len(m['runs'])} | {_ms(m['final_val_loss'])} | "
            f"{_ms(m['best_val_loss'])} | {acc} | {seeds} | {p['invalid'] if p['n'] else '-'} | "
            f"{_ms(m['seconds_per_step'], 3)} | {_memory(m)} |"
        )
    names = list(summary["methods"])
    lines += [
        "",
        "As the paper's tables lay it out (accuracy %, mean over seeds):",
        "",
        *paper_layout(summary, paper),
    ]
    labels = [summary["methods"][n].get("label", n) for n in names]
    lines += ["", "| task | n per run | majority label | " + " | ".join(labels) + " |"]
    lines.append("|---|---:|---:|" + "---:|" * len(names))
    for t in summary["tasks"]:
        cells, n = [], "-"
        for name in names:
            v = summary["methods"][name]["accuracy"]["per_task"][t]
            cells.append(f"{100 * v['accuracy']:.1f}" if v["accuracy"] is not None else "-")
            k = summary["methods"][name]["accuracy"]["evaluated_runs"]
            n = str(v["n"] // k) if k else n
        maj = summary["majority_label"].get(t)
        lines.append(
            f"| {t} | {n} | {'-' if maj is None else f'{100 * maj:.1f}'} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def plot(out: Path, summary: dict, path: Path) -> None:
    """Left: validation loss of every run (one colour per method); right: training loss, moving mean of 10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.get_cmap("tab10").colors
    for i, (name, m) in enumerate(summary["methods"].items()):
        color = colors[i % len(colors)]
        for j, run in enumerate(m["runs"]):
            rows = read_metrics_records(run_dir(out, run))
            curve = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
            if curve:
                axes[0].plot(
                    *zip(*curve, strict=True), "o-", color=color, alpha=0.7, label=name if j == 0 else None
                )
            steps, loss = [r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r]
            smooth = [statistics.mean(loss[max(0, k - 9) : k + 1]) for k in range(len(loss))]
            axes[1].plot(steps, smooth, color=color, alpha=0.7, label=name if j == 0 else None)
    axes[0].set(title="validation loss (every seed)", xlabel="step", ylabel="loss / target token")
    axes[1].set(title="training loss (moving mean of 10 steps)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(
    out: Path, config: Path, plans: list[MethodPlan], seeds: int, paper_name: str | None = None
) -> Path:
    from abba_cli.analysis.compare.paper_figures import paper_table

    summary = summarize(out, config, plans, seeds)
    paper = paper_table(paper_name) if paper_name is not None else None
    if paper is not None:
        summary["paper"] = {"name": paper_name, **paper}
    text = to_markdown(summary, paper)
    atomic_write_text(out / TABLE, text)
    atomic_write_json(out / SUMMARY, summary)
    plot(out, summary, out / CURVES)
    print(text)
    print(f"written: {out / TABLE}, {out / SUMMARY}, {out / CURVES}")
    return out / TABLE
