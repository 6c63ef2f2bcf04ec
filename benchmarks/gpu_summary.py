"""summary.md of a GPU check's results folder (scripts/gpu_check.sh): one short table per stage, from the JSON
each stage wrote; a stage that has not run or failed says so.

    python -m benchmarks.gpu_summary /tmp/gpu_check > summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import md_table


def _stage(res: Path, name: str) -> tuple[Any, str | None]:
    """A stage's result from whichever JSON holds it (one file per stage on the GPU, one for all with --smoke)."""
    if name == "commands":
        path = res / "commands.json"
        return (json.loads(path.read_text()), None) if path.is_file() else (None, "not run (see log.txt)")
    for path in sorted(res.glob("*.json")):
        stage = json.loads(path.read_text()).get("stages", {}).get(name)
        if stage is not None:
            return (None, f"failed: {stage['error']}") if "error" in stage else (stage["result"], None)
    return None, "not run or did not finish (see log.txt)"


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _bf16(rows: list[dict]) -> str:
    return md_table(
        ["m x n", "path", "max rel err (y, dx, factor grads)"],
        [[f"{r['m']}x{r['n']}", r["path"], f"{max(r['rel_err'].values()):.2e}"] for r in rows],
    )


def _steps(rows: list[dict]) -> str:
    return md_table(
        ["variant", "compiled", "ms / micro-batch", "x PEFT LoRA", "peak step GiB", "GPU busy"],
        [
            [r["variant"], r["compiled"], f"{r['ms_per_micro_batch']:.1f}",
             "-" if r["vs_peft_lora"] is None else f"{r['vs_peft_lora']:.2f}", _gib(r["peak_step_bytes"]),
             "-" if r["gpu_busy"] is None else f"{r['gpu_busy']:.2f}"]
            for r in rows
        ],
    )  # fmt: skip


def _loss_impls(rows: list[dict]) -> str:
    return md_table(
        ["loss_impl", "tokens x vocab", "rel err vs chunked (loss, d hidden, d weight)", "ms fwd+bwd", "peak GiB"],
        [
            [r["impl"], "-", r["skipped"], "-", "-"] if "skipped" in r else
            [r["impl"], f"{r['tokens']} x {r['vocab']}",
             f"{r['loss_rel_err']:.1e}, {r['d_hidden_rel_err']:.1e}, {r['d_weight_rel_err']:.1e}",
             f"{r['ms']:.1f}", _gib(r["peak_bytes"])]
            for r in rows
        ],
    )  # fmt: skip


def _decode(rows: list[dict]) -> str:
    return md_table(
        ["batch", "decode ms/step", "GSM8K upper min", "MATH upper min"],
        [[r["batch"], f"{r['decode_ms_per_step']:.1f}", f"{r['gsm8k_upper_min']:.1f}", f"{r['math_upper_min']:.1f}"]
         for r in rows],
    )  # fmt: skip


def _commands(data: dict) -> str:
    rows = []
    for name, r in data["commands"].items():
        fig = r.get("figures", {})
        extra = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in fig.items())
        rows.append(
            [name, r["exit"], f"{r['seconds']:.1f}", _gib(r["peak_gpu_bytes"]), extra or r.get("error", "")]
        )
    return md_table(["command", "exit", "seconds", "peak GiB", "figures"], rows)


def summarize(res: Path) -> str:
    out = [f"# GPU check: {res}\n"]
    render = {"bf16_error": _bf16, "step_1x512": _steps, "step_8x512": _steps, "step_packed_1x4096": _steps,
              "loss_impls": _loss_impls, "decode": _decode,
              "layers": lambda r: r["table"], "commands": _commands}  # fmt: skip
    for name, fn in render.items():
        result, problem = _stage(res, name)
        out.append(f"## {name}\n\n{problem or fn(result)}\n")
    return "\n".join(out)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1])))
