"""`abba export --rank K` against K on a trained run: dW's relative Frobenius error, the logit change, and
(optionally) held-out accuracy of the truncated export evaluated by `abba eval` itself (a PEFT LoRA folder).

    python -m benchmarks.truncation_sweep --run runs/quickstart --ranks 8,16,32,64,128 \
        --tasks piqa,siqa,winogrande,obqa --limit 50 --json benchmarks/results/truncation_quickstart.json

Counts and errors only (no timing), so a busy machine changes nothing but how long it takes. Accuracy uses rows
[0, limit) of each task, which `configs/quickstart.yaml` keeps out of training (commonsense_bundled_train).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from abba_cli.eval.evaluate import run_eval
from abba_cli.ship.export import TRUNCATION_REPORT, export_run
from benchmarks import common


def accuracy(run: Path, tasks: list[str], limit: int, out: Path) -> dict[str, dict]:
    """{task: {correct, n, invalid}} from `abba eval` with fixed settings (no run defaults apply)."""
    results = run_eval(tasks, run=run, limit=limit, skip=0, max_new_tokens=16, batch_size=16, out=out)
    return {r.task: {"correct": r.correct, "n": r.n, "invalid": r.invalid} for r in results}


def main(argv: list[str] | None = None) -> dict:
    parser = common.arg_parser(__doc__)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--ranks", default="8,16,32,64,128")
    parser.add_argument("--tasks", default="", help="comma-separated eval tasks; empty: errors only")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    rows = []
    with tempfile.TemporaryDirectory(prefix="truncation-") as tmp:
        if tasks:
            rows.append(
                {"rank": "exact", "accuracy": accuracy(args.run, tasks, args.limit, Path(tmp) / "exact-eval")}
            )
        for k in (int(x) for x in args.ranks.split(",")):
            out = export_run(format="peft-lora", out=Path(tmp) / f"k{k}", run=args.run, rank=k)
            report = (
                json.loads((out / TRUNCATION_REPORT).read_text())
                if (out / TRUNCATION_REPORT).is_file()
                else {}
            )
            row = {"rank": k, **{key: v for key, v in report.items() if key != "rel_frobenius_error"}}
            if tasks:
                row["accuracy"] = accuracy(out, tasks, args.limit, Path(tmp) / f"k{k}-eval")
            rows.append(row)
    result = {"run": str(args.run.resolve()), "tasks": tasks, "limit": args.limit, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        acc = row.get("accuracy", {})
        total = sum(a["correct"] for a in acc.values()), sum(a["n"] for a in acc.values())
        err = row.get("rel_frobenius_error_max")
        line = f"rank {row['rank']}: "
        if err is not None:
            line += f"dW error max {err:.4f} mean {row['rel_frobenius_error_mean']:.4f}; "
            if "logits" in row:
                line += f"logits max abs {row['logits']['max_abs_change']:.4g} ({row['logits']['change_vs_effect']:.3g} of effect); "
        if acc:
            line += f"accuracy {total[0]}/{total[1]}"
        print(line)
    return result


if __name__ == "__main__":
    main()
