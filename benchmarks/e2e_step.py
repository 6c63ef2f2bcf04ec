"""End-to-end training step of ABBA against our LoRA as a user meets it: wall time per step of `abba train`.

Every run is a real `abba train` subprocess (this tree's code) of configs/quickstart.yaml on the bundled
SmolLM2-135M with the overrides below, which pin every setting the time depends on, so the measurement does not
follow the quickstart's current values: GSM8K-style data (the bundled test problems [50, ...), 40 of them,
max_seq_len 256: real, ragged micro-batches), micro-batch 4, fp32, 6 optimizer steps, no checkpoints. ABBA
r1 = r2 = 16 (`auto` path) against our LoRA r = 32 (the same parameter count), at adapter dropout 0 and 0.05.

Step time of one run: (elapsed_s after the last step - elapsed_s after step `skip`) / (steps - skip), from the run's
metrics.jsonl. The first `skip` = 2 steps are left out, so model loading, tokenizing and first-step allocation
cancel. Runs are interleaved (A B C D, B C D A, ...: common.round_robin), and the ratio ABBA / LoRA is taken per
round at each dropout, so background load hits both alike; we report its median and range.

    python -m benchmarks.e2e_step                    # 5 rounds, dropout 0 and 0.05 (~20 runs of ~1 min, quiet CPU)
    python -m benchmarks.e2e_step --quick            # 2 rounds, dropout 0 (what `make bench` runs)
    python -m benchmarks.e2e_step --rounds 3 --set train.mixed_precision=bf16   # any extra `abba --set`
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

CONFIG = common.ROOT / "configs" / "quickstart.yaml"
TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
# The measured setting: everything that sets the step's cost, stated here rather than inherited.
SETTING = [
    "model.dtype=float32",
    "data.recipe=gsm8k_bundled_train",
    "data.path=null",
    "data.skip_samples=50",
    "data.num_samples=40",
    "data.max_seq_len=256",
    "data.seed=42",
    "data.train_on_inputs=false",
    "train.micro_batch_size=4",
    "train.grad_accum_steps=1",
    "train.mixed_precision='no'",  # quoted: YAML reads a bare no as false
    "train.gradient_checkpointing=false",
    "train.save_every=null",
    "train.log_every=1",
    "train.report_to=[]",
    "train.seed=42",
    "eval.tasks=[]",
    "data.val_samples=null",  # no validation pass inside the timed steps
    "data.val_path=null",
    "train.eval_every=null",
    f"adapter.target_modules={TARGETS}",
    "adapter.alpha=null",  # each method's default scale (the value does not change the cost)
]
METHODS = {
    "abba": ["adapter.type=abba", "adapter.r1=16", "adapter.r2=16", "adapter.r=null", "adapter.path=auto"],
    "lora": [
        "adapter.type=lora",
        "adapter.r=32",
        "adapter.r1=null",
        "adapter.r2=null",
        "adapter.init=default",
    ],
}
LABELS = {"abba": "ABBA r1=r2=16 (auto)", "lora": "our LoRA r=32"}


def run_overrides(method: str, dropout: float, steps: int, model: str, extra: list[str]) -> list[str]:
    return [
        f"model.name_or_path={model}",
        *SETTING,
        f"train.max_steps={steps}",
        *METHODS[method],
        f"adapter.dropout={dropout}",
        *extra,
    ]


def step_times(metrics: Path, skip: int) -> dict[str, Any]:
    """Per-step seconds after the first `skip` steps, from metrics.jsonl's cumulative elapsed_s."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    elapsed = {r["step"]: r["elapsed_s"] for r in rows}
    last = max(elapsed)
    if skip not in elapsed or last <= skip:
        raise RuntimeError(f"{metrics}: need steps {skip} and later logged, got {sorted(elapsed)}")
    steps = [elapsed[k] - elapsed[k - 1] for k in range(skip + 1, last + 1)]
    return {
        "step_s": (elapsed[last] - elapsed[skip]) / (last - skip),
        "steps_s": steps,
        "tokens": rows[-1]["tokens"],
        "loss": [r["loss"] for r in rows],
    }


def run_env(scratch: Path, threads: int = 0) -> dict[str, str]:
    """The environment of one timed run: the user's, minus the allocator settings `make bench` sets for its memory
    measurements (common.MEASURE_ENV hands freed memory back to the OS at once, so every step would page-fault its
    tensors in again: no user trains like that), with this tree's code and a scratch ABBA_HOME."""
    from abba_cli.models.bundled import models_cache_dir

    env = {k: v for k, v in os.environ.items() if k not in common.MEASURE_ENV}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(common.ROOT), os.environ.get("PYTHONPATH")])),
            "ABBA_HOME": str(scratch / "home"),  # the user's latest-run marker stays untouched
            "ABBA_MODELS_DIR": str(models_cache_dir()),  # but the converted SmolLM2 is reused
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        }
    )
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def train_once(overrides: list[str], skip: int, threads: int = 0) -> dict[str, Any]:
    """One `abba train` subprocess in a scratch run dir; its step time and `auto`'s plan (from stderr)."""
    scratch = Path(tempfile.mkdtemp(prefix="abba-e2e-"))
    env = run_env(scratch, threads)
    cmd = [sys.executable, "-m", "abba_cli", "train", str(CONFIG), "--set", f"output_dir={scratch / 'run'}"]
    for o in overrides:
        cmd += ["--set", o]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=common.ROOT, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"abba train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        out = step_times(scratch / "run" / "metrics.jsonl", skip)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    plan = re.search(r"^ABBA execution at .*$", proc.stderr, re.MULTILINE)
    out["plan"] = plan.group(0) if plan else None
    return out


def measure(
    rounds: int,
    dropouts: list[float],
    steps: int = 6,
    skip: int = 2,
    model: str | None = None,
    extra: list[str] | None = None,
    threads: int = 0,
) -> dict[str, Any]:
    """All runs, interleaved; per dropout the per-round ratio ABBA / LoRA (median, min, max)."""
    model = model or str(common.smollm2_dir())
    runs = {
        f"{method}@{p:g}": (
            lambda m=method, p=p: train_once(run_overrides(m, p, steps, model, extra or []), skip, threads)
        )
        for p in dropouts
        for method in METHODS
    }

    def show(i: int, out: dict) -> None:
        done = ", ".join(f"{name} {out[name][-1]['step_s']:.3f}s/step" for name in out)
        print(f"  round {i + 1}/{rounds}: {done}", file=sys.stderr, flush=True)

    results = common.round_robin(runs, rounds, show)
    rows = []
    for p in dropouts:
        abba = [r["step_s"] for r in results[f"abba@{p:g}"]]
        lora = [r["step_s"] for r in results[f"lora@{p:g}"]]
        med, lo, hi = common.ratio_spread(abba, lora)
        rows.append(
            {
                "dropout": p,
                "abba": common.summary(abba),
                "lora": common.summary(lora),
                "ratio": {
                    "median": med,
                    "min": lo,
                    "max": hi,
                    "per_round": [a / b for a, b in zip(abba, lora, strict=True)],
                },
                "plan": results[f"abba@{p:g}"][0]["plan"],
            }
        )
    return {
        "config": {
            "rounds": rounds,
            "steps": steps,
            "skip": skip,
            "threads": threads,
            "model": model,
            "base_config": str(CONFIG.relative_to(common.ROOT)),
            "overrides": {m: run_overrides(m, "DROPOUT", steps, model, extra or []) for m in METHODS},
        },
        "machine": common.machine_info(),
        "rows": rows,
        "runs": results,
    }


def to_markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    headers = [
        "adapter dropout",
        "ABBA s/step (median, min..max)",
        "LoRA s/step (median, min..max)",
        "ABBA / LoRA (median)",
        "min..max",
        "per round",
    ]
    rows = []
    for r in res["rows"]:
        a, b, q = r["abba"], r["lora"], r["ratio"]
        rows.append(
            [
                f"{r['dropout']:g}",
                f"{a['median']:.3f} ({a['min']:.3f}..{a['max']:.3f})",
                f"{b['median']:.3f} ({b['min']:.3f}..{b['max']:.3f})",
                f"{q['median']:.3f}",
                f"{q['min']:.2f}..{q['max']:.2f}",
                ", ".join(f"{x:.2f}" for x in q["per_round"]),
            ]
        )
    head = (
        f"`abba train` of SmolLM2-135M, {LABELS['abba']} vs {LABELS['lora']}, micro-batch 4, max_seq_len 256, fp32; "
        f"steps {cfg['skip'] + 1}-{cfg['steps']} of {cfg['steps']} timed, {cfg['rounds']} interleaved rounds"
    )
    plans = sorted({r["plan"] for r in res["rows"] if r["plan"]})
    return f"{head}\n\n" + common.md_table(headers, rows) + "".join(f"\n\n{p}" for p in plans)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.arg_parser(__doc__)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each: one run per variant)")
    p.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.05])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=2, help="leading steps left out (loading cancels)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the runs (0: torch's default)")
    p.add_argument("--model", help="model.name_or_path (default: the bundled SmolLM2, converted)")
    p.add_argument("--set", dest="extra", action="append", default=[], help="one more abba --set override")
    p.add_argument("--quick", action="store_true", help="2 rounds at dropout 0 (make bench)")
    p.add_argument("--out", type=Path, help="write the JSON result here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.dropouts = 2, [0.0]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    res = measure(args.rounds, args.dropouts, args.steps, args.skip, args.model, args.extra, args.threads)
    res["wall_min"] = (time.perf_counter() - t0) / 60
    return common.finish(res, args.out, to_markdown(res))


if __name__ == "__main__":
    main()
