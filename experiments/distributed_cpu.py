"""distributed.strategy on 2 CPU processes: start-up time, step time and peak host memory per process of
fsdp, zero2 and zero3 against ddp.

Every run is a real `abba train` launched by torchrun (2 processes, gloo; DeepSpeed on its CPU accelerator)
with the setting of benchmarks.e2e_step (bundled SmolLM2-135M, fp32, ABBA r1 = r2 = 16 on every linear
layer, micro-batch 4, 6 steps) and micro-batch 2 per process, so the global batch is the same 4. Each process
reports, from inside (this script is also the torchrun worker, `--worker`):
- startup_s: from the process's creation to the first training step (imports, loading, adapter init, prepare);
- peak_setup_mib: its resident high-water mark (VmHWM) when training starts; peak_mib: at exit.
Step time is (elapsed after the last step - elapsed after step 2) / 4, from metrics.jsonl. Strategies run
interleaved over rounds (common.round_robin); only meaningful on a quiet machine (check `uptime` first).
These are CPU numbers: they show what sharding costs in communication and saves in memory per process on this
model, not GPU speed.

    python -m experiments.distributed_cpu                 # 2 rounds of ddp, fsdp, zero2, zero3
    python -m experiments.distributed_cpu --strategies ddp fsdp --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common, e2e_step
from experiments import RESULTS_DIR

STRATEGIES = ["ddp", "fsdp", "zero2", "zero3"]
STEPS, SKIP = 6, 2
OUT_ENV = "ABBA_BENCH_OUT"


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def worker(argv: list[str]) -> None:
    """`abba train ARGV` as one torchrun process, reporting its start-up time and peak memory."""
    import atexit

    import psutil

    from abba_cli.train import pipeline

    created = psutil.Process().create_time()
    report: dict[str, Any] = {"rank": int(os.environ.get("RANK", "0"))}
    fit = pipeline.fit

    def timed_fit(run: Any) -> None:
        report["startup_s"] = time.time() - created
        report["peak_setup_mib"] = _vm_hwm_mib()
        fit(run)

    pipeline.fit = timed_fit  # the name run_training calls

    def write() -> None:
        report["peak_mib"] = _vm_hwm_mib()
        out = Path(os.environ[OUT_ENV]) / f"rank-{report['rank']}.json"
        out.write_text(json.dumps(report))

    atexit.register(write)
    from abba_cli.cli import app

    app(args=argv, prog_name="abba")


def train_once(strategy: str) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix=f"abba-dist-{strategy}-"))
    env = e2e_step.run_env(scratch, threads=1)
    env.update({"ACCELERATE_USE_CPU": "true", OUT_ENV: str(scratch), "TOKENIZERS_PARALLELISM": "false"})
    overrides = [
        *e2e_step.run_overrides("abba", 0.0, STEPS, str(common.smollm2_dir()), []),
        "train.micro_batch_size=2",
        f"distributed.strategy={strategy}",
        f"output_dir={scratch / 'run'}",
    ]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launch, "-m", __spec__.name, "--worker", "train", str(e2e_step.CONFIG)]
    for o in overrides:
        cmd += ["--set", o]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=common.ROOT, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{strategy}: abba train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        ranks = [json.loads((scratch / f"rank-{r}.json").read_text()) for r in (0, 1)]
        out = e2e_step.step_times(scratch / "run" / "metrics.jsonl", SKIP)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "step_s": out["step_s"],
        "loss": out["loss"],
        "startup_s": max(r["startup_s"] for r in ranks),
        "peak_setup_mib": max(r["peak_setup_mib"] for r in ranks),
        "peak_mib": max(r["peak_mib"] for r in ranks),
        "per_rank": ranks,  # fsdp: rank 0 reads the weights, rank 1 builds a meta skeleton
    }


def to_markdown(res: dict[str, Any]) -> str:
    rows = []
    ddp = res["strategies"].get("ddp")
    for name, runs in res["strategies"].items():
        med = {
            k: statistics.median(r[k] for r in runs)
            for k in ("step_s", "startup_s", "peak_setup_mib", "peak_mib")
        }
        ratio = f"{med['step_s'] / statistics.median(r['step_s'] for r in ddp):.2f}x" if ddp else "-"
        rows.append(
            [
                name,
                f"{med['step_s']:.2f}",
                ratio,
                f"{med['startup_s']:.1f}",
                f"{med['peak_setup_mib']:.0f}",
                f"{med['peak_mib']:.0f}",
            ]
        )
    headers = ["strategy", "step s", "vs ddp", "start-up s", "peak MiB at start (max of ranks)", "peak MiB"]
    return (
        common.md_table(headers, rows)
        + f"\n\n2 CPU processes, median of {res['rounds']} round(s); {res['machine']}\n"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    fns = {s: (lambda s=s: train_once(s)) for s in args.strategies}
    runs = common.round_robin(fns, args.rounds)
    res = {"strategies": runs, "rounds": args.rounds, "machine": common.machine_info()}
    common.write_json(RESULTS_DIR / "distributed_cpu.json", res)
    print(to_markdown(res))
    return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        main()
