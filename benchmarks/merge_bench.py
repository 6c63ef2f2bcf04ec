"""Merging an ABBA adapter into SmolLM2-135M: time and peak memory.

Two measurements, each in a fresh subprocess (peak memory, see common.py):
- in memory: `merge_adapters` + `unwrap_adapters` on the loaded model (what `abba eval` does);
- end to end: `abba_cli.ship.merge.merge_run` on a saved run (load base, load adapter, fold layer by layer, write
  the HF folder, reload it and compare logits), timed as a whole.
The adapter is random (r1 = r2 = 16, all seven projections, B2 ~ N(0, 1e-3)) so the merge does real work.

    python -m benchmarks.merge_bench
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import common

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapted_model(dtype: torch.dtype):
    from abba_cli.adapters import inject_adapters
    from abba_cli.config import AdapterConfig

    cfg = AdapterConfig(type="abba", r1=16, r2=16, target_modules=TARGETS)
    model = common.load_smollm2(dtype)
    inject_adapters(model, cfg, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("B2"):
                p.normal_(0, 1e-3)
    return model.eval(), cfg


def in_memory(dtype: torch.dtype) -> dict[str, Any]:
    from abba_cli.adapters import merge_adapters, unwrap_adapters

    model, _ = _adapted_model(dtype)
    resting = common.reset_peak("cpu")
    t0 = time.perf_counter()
    merge_adapters(model)
    unwrap_adapters(model)
    seconds = time.perf_counter() - t0
    peak = common.read_peak("cpu")
    return {
        "what": "merge_adapters+unwrap",
        "seconds": seconds,
        "step_peak_bytes": peak - resting,
        "peak_bytes": peak,
    }


def end_to_end(dtype: torch.dtype) -> dict[str, Any]:
    from abba_cli.adapters import save_adapter
    from abba_cli.ship.merge import merge_run

    model, cfg = _adapted_model(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        save_adapter(model, cfg, run_dir, base_model=str(common.smollm2_dir()))
        del model
        resting = common.reset_peak("cpu")
        t0 = time.perf_counter()
        merge_run(Path(tmp) / "merged", run=run_dir)
        seconds = time.perf_counter() - t0
        peak = common.read_peak("cpu")
    return {
        "what": "merge_run (end to end)",
        "seconds": seconds,
        "step_peak_bytes": peak - resting,
        "peak_bytes": peak,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.arg_parser(__doc__)
    p.add_argument("--dtype", choices=list(common.DTYPES), default="fp32")
    p.add_argument("--only", choices=["in_memory", "end_to_end"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    dtype = common.DTYPES[args.dtype]
    if args.only:
        print(json.dumps((in_memory if args.only == "in_memory" else end_to_end)(dtype)))
        return {}
    rows = [
        common.run_json_subprocess(__spec__.name, [f"--dtype={args.dtype}", f"--only={what}"])
        for what in ("in_memory", "end_to_end")
    ]
    res = {"config": {"dtype": args.dtype}, "machine": common.machine_info(), "rows": rows}
    return common.finish(res, args.out, to_markdown(res))


def to_markdown(res: dict[str, Any]) -> str:
    rows = [
        [
            r["what"],
            f"{r['seconds']:.2f}",
            f"{common.mib(r['step_peak_bytes']):.0f}",
            f"{common.mib(r['peak_bytes']):.0f}",
        ]
        for r in res["rows"]
    ]
    return (
        f"SmolLM2-135M ({res['config']['dtype']} base), random ABBA r1=r2=16 on all seven projections\n\n"
        + (common.md_table(["merge", "seconds", "peak above resting MiB", "VmHWM MiB"], rows))
    )


if __name__ == "__main__":
    main()
