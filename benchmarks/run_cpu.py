"""`make bench`: the CPU benchmark set (under 15 minutes on 2 quiet cores), results into benchmarks/RESULTS.md.

Runs, in order, each as its own process: the SmolLM2 training step table (step_bench), the quick layer sweep
(layer_sweep --quick), generation speed with a merged adapter (eval_speed), the merge (merge_bench) and the
end-to-end `abba train` step, ABBA against our LoRA (e2e_step --quick: 2 rounds at dropout 0). JSON goes
to benchmarks/results/, tables replace their blocks inside the "## Performance" section of RESULTS.md (other
sections are left alone). The full layer sweep is not part of this set: `python -m benchmarks.layer_sweep --fit`.

    python -m benchmarks.run_cpu [--skip step sweep eval merge e2e] [--no-results-md]
    python -m benchmarks.run_cpu --record step "python -m benchmarks.step_bench ..." \
        benchmarks/results/step_smollm2_cpu.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common, e2e_step, eval_speed, layer_sweep, merge_bench, step_bench

# key: (module in this package, its arguments, the JSON it writes to benchmarks/results/)
JOBS = {
    "step": (
        "step_bench",
        # one measured step for memory (after two warm-up steps the peak repeats): keeps the set under 15 min
        [
            "--repeats",
            "3",
            "--mem-steps",
            "1",
            "--variants",
            "peft_lora",
            "abba",
            "lora",
            "hira",
            "peft_loha",
            "full",
        ],
        "step_smollm2_cpu.json",
    ),
    # One torch thread: on a shared 2-core machine a descheduled OpenMP thread stalls every op, which swamps
    # the per-cell differences the cost model is judged on.
    "sweep": (
        "layer_sweep",
        ["--quick", "--repeats", "3", "--threads", "1"],
        "layer_sweep_quick_cpu.json",
    ),
    "eval": ("eval_speed", ["--repeats", "3"], "eval_speed_smollm2_cpu.json"),
    "merge": ("merge_bench", [], "merge_smollm2_cpu.json"),
    # Real `abba train` subprocesses (6 steps each, the first 2 left out); the full run is 5 rounds with dropout.
    "e2e": ("e2e_step", ["--quick"], "e2e_step_smollm2_quick_cpu.json"),
}


def render(key: str, res: dict[str, Any]) -> str:
    if key.startswith("step"):
        return step_bench.to_markdown(res)
    if key.startswith("sweep"):
        text = layer_sweep.to_markdown(res["cells"], res["cost_model"])
        costs = ", ".join(f"{k}={v:.3g}" for k, v in res["cost_model"].items())
        text += f"\n\nauto's worst regret with {costs}: {res['auto_worst_regret']:+.1%}"
        if "fit" in res:
            text += "; fitted: " + ", ".join(f"{k}={v:.3g}" for k, v in res["fit"].items())
        return text
    if key.startswith("e2e"):
        return e2e_step.to_markdown(res)
    if key.startswith("eval"):
        return eval_speed.to_markdown(res)
    return merge_bench.to_markdown(res)


def _shown_path(out: Path) -> str:
    """The result file as RESULTS.md cites it: relative to the checkout (gpu/ files keep their folder)."""
    try:
        return str(out.resolve().relative_to(common.ROOT))
    except ValueError:
        return f"benchmarks/results/{out.name}"


def record(key: str, shown: str, out: Path, minutes: float | None = None) -> None:
    """Put the table of one result JSON into its block of RESULTS.md, with the command and the machine."""
    res = json.loads(out.read_text())
    m = res["machine"]
    took = f" ({minutes:.1f} min)" if minutes is not None else ""
    meta = (
        f"`{shown}`{took} on {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads), "
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; "
        f"JSON: `{_shown_path(out)}`"
    )
    common.update_results_block(key, f"{meta}\n\n{render(key, res)}")


def main() -> None:
    p = common.arg_parser(__doc__)
    p.add_argument("--skip", nargs="*", default=[], choices=list(JOBS))
    p.add_argument("--no-results-md", action="store_true", help="do not touch RESULTS.md")
    p.add_argument("--record", nargs=3, metavar=("KEY", "COMMAND", "JSON"), help="only (re)write one block")
    args = p.parse_args()
    if args.record:
        key, shown, out = args.record
        record(key, shown, Path(out))
        return
    env = {**os.environ, **common.MEASURE_ENV}
    started = time.perf_counter()
    for key, (module, extra, out_name) in JOBS.items():
        if key in args.skip:
            continue
        out = common.RESULTS_DIR / out_name
        cmd = [sys.executable, "-m", f"benchmarks.{module}", *extra, "--out", str(out)]
        shown = " ".join(["python -m", f"benchmarks.{module}", *extra])
        print(f"== {shown}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=common.ROOT, stdout=subprocess.PIPE, text=True, check=False)
        print(proc.stdout, flush=True)
        if proc.returncode != 0:
            sys.exit(f"{shown} failed with exit code {proc.returncode}")
        if not args.no_results_md:
            record(key, shown, out, (time.perf_counter() - t0) / 60)
    print(f"all done in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
