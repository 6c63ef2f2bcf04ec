"""Where an `abba train` step spends its time: torch.profiler over real training steps, as shares of the step.

Runs `run_training` in this process with exactly e2e_step.py's setting (configs/quickstart.yaml + its overrides)
and profiles the optimizer steps after the first `--skip` (a global optimizer-step hook advances the profiler's
schedule, so train.py is untouched). The loop's own work is labelled by wrapping its helpers here: forward,
loss, backward, clipping, the finiteness check, collation. Prints the share of the profiled steps that each label
and each top op takes (self CPU time). Shares, not seconds: the profiler's per-op overhead inflates small ops,
and on a shared machine absolute times mean little.

    python -m benchmarks.profile_train --method abba --dropout 0 [--steps 6 --skip 2] [--out trace.json]
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from benchmarks import common, e2e_step

LABELS = (
    "model forward",
    "adapted layers forward",
    "loss",
    "backward",
    "clip_grad_norm",
    "finiteness check",
    "collate",
)


def _labelled(fn, label: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return wrapper


def _instrument() -> None:
    """Label the loop's parts by wrapping what the loop calls: the run object's loss seam, library methods, and
    the loop's own finiteness check (looked up in train/loop.py's namespace at call time)."""
    from accelerate import Accelerator
    from transformers import LlamaForCausalLM

    from abba_cli.adapters.base import AdapterLinear
    from abba_cli.data.collate import DataCollator
    from abba_cli.train import loop
    from abba_cli.train.context import Run

    LlamaForCausalLM.forward = _labelled(LlamaForCausalLM.forward, "model forward")
    AdapterLinear.forward = _labelled(
        AdapterLinear.forward, "adapted layers forward"
    )  # frozen matmul included
    Run.loss_fn = _labelled(Run.loss_fn, "loss")
    Accelerator.backward = _labelled(Accelerator.backward, "backward")
    Accelerator.clip_grad_norm_ = _labelled(Accelerator.clip_grad_norm_, "clip_grad_norm")
    loop.all_finite = _labelled(loop.all_finite, "finiteness check")
    DataCollator.__call__ = _labelled(DataCollator.__call__, "collate")


def profile(
    method: str, dropout: float, steps: int, skip: int, model: str | None, extra: list[str], out: Path | None
) -> dict:
    from abba_cli.config import load_config
    from abba_cli.train.pipeline import run_training

    _instrument()
    model = model or str(common.smollm2_dir())
    with tempfile.TemporaryDirectory(prefix="abba-prof-") as tmp:
        overrides = [*e2e_step.run_overrides(method, dropout, steps, model, extra), f"output_dir={tmp}/run"]
        cfg = load_config(e2e_step.CONFIG, overrides)
        prof = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU],
            schedule=torch.profiler.schedule(wait=skip - 1, warmup=1, active=steps - skip, repeat=1),
        )
        hook = register_optimizer_step_post_hook(lambda *_: prof.step())
        try:
            with prof:
                run_training(cfg, e2e_step.CONFIG)
        finally:
            hook.remove()
    if out:
        prof.export_chrome_trace(str(out))
    return shares(prof.events())


def shares(events: Any, top: int = 25) -> dict:
    """Inclusive share of each label and self-time share of each op, over the ProfilerStep# windows."""
    total = sum(e.cpu_time_total for e in events if e.name.startswith("ProfilerStep"))
    labels = {lab: sum(e.cpu_time_total for e in events if e.name == lab) / total for lab in LABELS}
    ops: dict[str, list[float]] = {}
    for e in events:
        if e.name.startswith("ProfilerStep") or e.name in LABELS:
            continue
        acc = ops.setdefault(e.name, [0.0, 0])
        acc[0] += e.self_cpu_time_total
        acc[1] += 1
    ranked = sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]
    steps = max(sum(1 for e in events if e.name.startswith("ProfilerStep")), 1)
    return {
        # op calls per step: a count, not a time, so it compares across runs and machines
        "ops_per_step": sum(n for _, n in ops.values()) / steps,
        # milliseconds per profiled step (profiler overhead included): to set two methods' parts side by side
        "ms_per_step": total / steps / 1e3,
        "labels": labels,
        "ops": [
            {"op": name, "self_share": t / total, "ms_per_step": t / steps / 1e3, "calls": int(n)}
            for name, (t, n) in ranked
        ],
    }


def to_markdown(res: dict, title: str) -> str:
    step_ms = res["ms_per_step"]
    lab = common.md_table(
        ["part of the step", "share", "ms per step"],
        [[k, f"{v:.1%}", f"{v * step_ms:.0f}"] for k, v in res["labels"].items()],
    )
    ops = common.md_table(
        ["op (self time)", "share", "ms per step", "calls"],
        [[o["op"], f"{o['self_share']:.1%}", f"{o['ms_per_step']:.0f}", o["calls"]] for o in res["ops"]],
    )
    head = f"{title} ({res['ops_per_step']:.0f} op calls and {step_ms:.0f} ms per profiled step)"
    return f"{head}\n\n{lab}\n\n{ops}"


def main(argv: list[str] | None = None) -> dict:
    p = common.arg_parser(__doc__)
    p.add_argument("--method", choices=list(e2e_step.METHODS), default="abba")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--model", help="model.name_or_path (default: the bundled SmolLM2, converted)")
    p.add_argument("--set", dest="extra", action="append", default=[], help="one more abba --set override")
    p.add_argument("--trace", type=Path, help="also write a Chrome trace here")
    p.add_argument("--out", type=Path, help="write the shares as JSON here")
    args = p.parse_args(argv)
    res = profile(args.method, args.dropout, args.steps, args.skip, args.model, args.extra, args.trace)
    return common.finish(
        res,
        args.out,
        to_markdown(res, f"{args.method}, dropout {args.dropout:g}: steps {args.skip + 1}-{args.steps}"),
    )


if __name__ == "__main__":
    main()
