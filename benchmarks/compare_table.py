"""Tables and the validation-loss plot of the ABBA / LoRA / HiRA comparison (scripts/compare_cpu.sh writes the runs).

Layout read under ROOT (default runs/compare):
    ROOT/sweep/heldout.json                       benchmarks/heldout_loss.py over the sweep runs
    ROOT/sweep/<name>/metrics.jsonl               the sweep runs' training logs
    ROOT/final/<method>_seed<k>/metrics.jsonl     training log with val_loss records (train.eval_every)
    ROOT/final/<method>_seed<k>/eval/<task>/      `abba eval` on the held-out questions
    ROOT/base/eval/<task>/                        the untuned base model on the same questions (optional)
Every cell comes from these files; nothing is typed in by hand.

    python benchmarks/compare_table.py [--root runs/compare] [--out benchmarks/results/compare_cpu.md]
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_repro_table import majority_share, read_eval, read_train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402

METHODS = {"abba": "ABBA (sweep's s)", "abba_default": "ABBA (default s)", "lora": "LoRA", "hira": "HiRA"}
TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")


def val_curve(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def final_runs(root: Path) -> dict[str, list[Path]]:
    runs: dict[str, list[Path]] = {}
    for run in sorted((root / "final").glob("*_seed*")):
        # only finished runs: a run still training (no final adapter yet) would mix a partial curve in
        if (run / "adapter_model.safetensors").is_file() and (run / "metrics.jsonl").is_file():
            runs.setdefault(run.name.split("_seed")[0], []).append(run)
    return runs


def pooled(evals: list[dict[str, dict]]) -> tuple[int, int, int]:
    """(correct, n, invalid) over every task of every run."""
    c = n = inv = 0
    for ev in evals:
        for task in TASKS:
            if task in ev:
                c, n, inv = c + ev[task]["correct"], n + ev[task]["n"], inv + ev[task].get("invalid", 0)
    return c, n, inv


def ci95(correct: int, n: int) -> float:
    """Half-width of the normal 95% interval of an accuracy, in points."""
    p = correct / n
    return 100 * 1.96 * math.sqrt(p * (1 - p) / n)


def mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} (n={len(values)})"


def sweep_table(root: Path) -> list[str]:
    path = root / "sweep" / "heldout.json"
    if not path.is_file():
        return []
    out = [
        "| run | s (ABBA) or lr (LoRA) | held-out loss | train loss, steps 1-10 | train loss, last 20 | "
        "first grad norm |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for r in json.loads(path.read_text()):
        a, run = r["adapter"], root / "sweep" / Path(r["run"]).name
        if a["type"] == "abba":
            scale = (
                a["alpha"]
                if a.get("scaling") == "released"
                else a["alpha"] ** 2 / math.sqrt(a["r1"] * a["r2"])
            )
            key, knob = (0, scale), f"s = {scale:g}"
        else:
            key, knob = (1, r["lr"]), f"lr {r['lr']:g}"
        log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        loss = [x["loss"] for x in log if "loss" in x]
        rows.append(
            (
                key,
                f"| {run.name} | {knob} | {r['heldout_loss']:.4f} | {statistics.mean(loss[:10]):.3f} | "
                f"{statistics.mean(loss[-20:]):.3f} | {log[0]['grad_norm']:.2f} |",
            )
        )
    return out + [line for _, line in sorted(rows)]


def final_tables(root: Path) -> list[str]:
    runs = final_runs(root)
    base = read_eval(root / "base") if (root / "base" / "eval").is_dir() else {}
    out = [
        "| method | seeds | final val_loss | best val_loss | train loss (last 5) | accuracy, pooled | 95% CI | "
        "per seed | invalid |",
        "|---|---:|---|---|---|---:|---:|---|---:|",
    ]
    if base:
        c, n, inv = pooled([base])
        out.append(
            f"| base (untuned) | - | - | - | - | {100 * c / n:.1f}% (n={n}) | ± {ci95(c, n):.1f} | - | {inv} |"
        )
    for method, label in METHODS.items():
        group = runs.get(method, [])
        if not group:
            continue
        finals = [val_curve(r)[-1][1] for r in group if val_curve(r)]
        bests = [min(v for _, v in val_curve(r)) for r in group if val_curve(r)]
        train = [read_train(r)["final_loss"] for r in group]
        evals = [read_eval(r) for r in group]
        evals = [e for e in evals if all(t in e for t in TASKS)]
        c, n, inv = pooled(evals) if evals else (0, 0, 0)
        per_seed = ", ".join(f"{100 * pooled([e])[0] / pooled([e])[1]:.1f}" for e in evals)
        acc = f"{100 * c / n:.1f}% (n={n})" if n else "-"
        half = f"± {ci95(c, n):.1f}" if n else "-"
        out.append(
            f"| {label} | {len(group)} | {mean_spread(finals)} | {mean_spread(bests)} | {mean_spread(train)} | "
            f"{acc} | {half} | {per_seed or '-'} | {inv} |"
        )
    # Per task: mean accuracy over seeds, and the slice's majority-label floor.
    ref = next((r for g in runs.values() for r in g if (r / "eval").is_dir()), None)
    out += ["", "| task | n | majority label | " + " | ".join(["base", *METHODS.values()]) + " |"]
    out.append("|---|---:|---:|" + "---:|" * (1 + len(METHODS)))
    for task in TASKS:
        cells = []
        for ev_list in [[base], *[[read_eval(r) for r in runs.get(m, [])] for m in METHODS]]:
            accs = [100 * e[task]["correct"] / e[task]["n"] for e in ev_list if task in e]
            cells.append(f"{statistics.mean(accs):.1f}" if accs else "-")
        n = base.get(task, {}).get("n") or next((read_eval(r)[task]["n"] for r in [ref] if r), "-")
        maj = majority_share(ref, task) if ref else None
        out.append(
            f"| {task} | {n} | {'-' if maj is None else f'{100 * maj:.1f}'} | " + " | ".join(cells) + " |"
        )
    return out


def plot(root: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = final_runs(root)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (method, label), color in zip(
        METHODS.items(), ("tab:red", "tab:orange", "tab:blue", "tab:green"), strict=True
    ):
        for i, run in enumerate(runs.get(method, [])):
            curve = val_curve(run)
            if curve:
                axes[0].plot(
                    *zip(*curve, strict=True), "o-", color=color, alpha=0.7, label=label if i == 0 else None
                )
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
            steps = [r["step"] for r in rows if "loss" in r]
            loss = [r["loss"] for r in rows if "loss" in r]
            k = 10  # moving average: single-example steps are noisy
            smooth = [statistics.mean(loss[max(0, j - k + 1) : j + 1]) for j in range(len(loss))]
            axes[1].plot(steps, smooth, color=color, alpha=0.7, label=label if i == 0 else None)
    axes[0].set(title="validation loss (held-out examples, every seed)", xlabel="step", ylabel="loss / token")
    axes[1].set(title="training loss (moving average of 10 steps)", xlabel="step")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = common.arg_parser(__doc__)
    p.add_argument("--root", type=Path, default=Path("runs/compare"))
    p.add_argument("--out", type=Path, help="also write the markdown here")
    p.add_argument(
        "--plot", type=Path, default=Path(__file__).resolve().parent / "results" / "compare_val_loss.png"
    )
    args = p.parse_args(argv)
    lines = ["#### Sweep (judged on held-out loss only)", "", *sweep_table(args.root), ""]
    lines += ["#### Chosen settings, several seeds", "", *final_tables(args.root)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if final_runs(args.root):
        plot(args.root, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
