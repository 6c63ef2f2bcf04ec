"""One adapted linear layer, forward + backward: ABBA's exact paths, `auto`, and LoRA at the same budget.

Cells: layer shapes of SmolLM2-135M, Llama-3.2-1B and Mistral-7B x total rank r (LoRA rank r; ABBA
r1 = r2 = r/2, the same (r1 + r2)(m + n) parameters) x tokens per micro-batch, without adapter dropout and (with
`--dropout`) with it. Each cell times, round-robin in one process, LoRA, the Khatri-Rao path, the merged path and
the hybrid path (not with dropout, where it does not exist); x requires grad, so dx is computed as inside a
model. `auto` dispatches to exactly one of the functions (choose_path is a few integer operations), so its time
in a cell is the measured time of the path it picks; the table shows which one and its regret
(auto / fastest - 1). Peak memory: the peak above the resting state of one forward + backward (CUDA: max
allocated; CPU: VmHWM, see common.py).

`--fit` fits the cost model's constants (abba.COST_CONSTANTS; a big matmul multiply-add = 1) to the cells
(minimising auto's worst regret, then the total) and prints the constants to put in abba_cli/adapters/abba.py.
`--refit JSON...` does the same on recorded sweeps without measuring again.

    python -m benchmarks.layer_sweep --quick               # SmolLM2 + Llama-1B shapes, small ranks (CPU minutes)
    python -m benchmarks.layer_sweep --fit                 # full grid; big cells get fewer repeats
    python -m benchmarks.layer_sweep --quick --dropout     # the same cells with adapter dropout on
    python -m benchmarks.layer_sweep --device cuda --dtype bf16 --fit
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from abba_cli.adapters import abba, cost
from benchmarks import common
from benchmarks.op_count import OpCounter

SHAPES = {
    "smollm2.q/o": (576, 576),
    "smollm2.gate/up": (1536, 576),
    "smollm2.down": (576, 1536),
    "llama1b.q/o": (2048, 2048),
    "llama1b.gate/up": (8192, 2048),
    "mistral7b.q/o": (4096, 4096),
    "mistral7b.gate/up": (14336, 4096),
}
RANKS = [8, 16, 32, 64, 128]
TOKENS = [256, 2048]
QUICK_SHAPES = ["smollm2.q/o", "smollm2.gate/up", "smollm2.down", "llama1b.q/o"]
QUICK_RANKS = [8, 32, 128]
QUICK_TOKENS = [256, 2048]


def _cell_inputs(m: int, n: int, r: int, tokens: int, device: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(m * 7 + n * 13 + r)

    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    h = r // 2
    w = rnd(m, n, scale=n**-0.5).to(dtype)
    x = rnd(tokens, n, scale=1.0).to(dtype).requires_grad_(True)
    dy = rnd(tokens, m, scale=1.0).to(dtype)
    abba_f = [rnd(m, h, scale=0.1), rnd(h, n, scale=0.1), rnd(m, h, scale=0.1), rnd(h, n, scale=0.1)]
    lora_f = [rnd(r, n, scale=0.1), rnd(m, r, scale=0.1)]
    for t in abba_f + lora_f:  # adapter factors stay fp32 (as in the layers); compute runs in `dtype`
        t.requires_grad_(True)
    return w, x, dy, abba_f, lora_f


def _runners(w, x, dy, abba_f, lora_f, s: float = 1.0, dropout: bool = False):
    """Forward + backward closures of the variants (gradients cleared so memory does not accumulate).

    With `dropout` the adapter's input is a dropped-out copy of x (p = 0.05, a fresh mask each call, as in
    training), which is what makes the merged path pay for a second weight and removes the hybrid path."""
    params = [x, *abba_f, *lora_f]
    dtype = x.dtype

    def clear() -> None:
        for p in params:
            p.grad = None

    def adapter_input():
        return F.dropout(x, 0.05) if dropout else x

    def lora() -> None:
        clear()
        a, b = lora_f
        y = (
            F.linear(x, w) + (adapter_input() @ a.to(dtype).T) @ b.to(dtype).T * s
        )  # as LoRALinear computes it
        y.backward(dy)

    def kr() -> None:
        clear()
        y = abba._KhatriRaoABBA.apply(x, adapter_input() if dropout else None, w, None, s, *abba_f)
        y.backward(dy)

    def merged() -> None:
        clear()
        y = abba._MergedABBA.apply(x, adapter_input() if dropout else None, w, None, s, *abba_f)
        y.backward(dy)

    def hybrid() -> None:
        clear()
        y = abba._HybridABBA.apply(x, w, None, s, *abba_f)
        y.backward(dy)

    runners = {"lora": lora, "khatri_rao": kr, "merged": merged, "hybrid": hybrid}
    if dropout:
        del runners["hybrid"]
    return runners


def _cell_flops(m: int, n: int, r: int, tokens: int) -> float:
    """Rough multiply-adds of the merged path's fwd + bwd, used only to pick how many repeats a cell gets."""
    return 3 * m * n * tokens + (r * r // 4) * (m + n) * tokens


def run_cell(
    name: str, m: int, n: int, r: int, tokens: int, args: argparse.Namespace, dropout: bool = False
) -> dict[str, Any]:
    dtype = common.DTYPES[args.dtype]
    w, x, dy, abba_f, lora_f = _cell_inputs(m, n, r, tokens, args.device, dtype)
    fns = _runners(w, x, dy, abba_f, lora_f, dropout=dropout)
    # Big cells are slow on a 2-core CPU: fewer repeats (budget in multiply-adds per cell).
    repeats = max(1, min(args.repeats, int(args.budget / max(1.0, _cell_flops(m, n, r, tokens)))))
    times = common.interleaved(fns, repeats, args.device, warmup=1)
    launches = {}
    for key, fn in fns.items():  # what the fit's launch term prices: deterministic, counted once
        with OpCounter() as counter:
            fn()
        launches[key] = counter.total
    mem = {}
    for key, fn in fns.items():
        base = common.reset_peak(args.device)
        fn()
        mem[key] = common.read_peak(args.device) - base
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "shape": name,
        "m": m,
        "n": n,
        "r": r,
        "r1": r // 2,
        "r2": r // 2,
        "tokens": tokens,
        "dropout": dropout,
        "repeats": repeats,
        "times": times,
        "median": med,
        "spread": {k: [min(v), max(v)] for k, v in times.items()},
        "peak_bytes": mem,
        "launches": launches,
    }


COST_NAMES = cost.COST_CONSTANTS
PATHS = abba.PATHS
# Kernel-launching ops of one cell's forward + backward per path, for sweeps recorded before the sweep counted
# them (`launches` in each cell): the code up to commit e68102f, counted with benchmarks/op_count.py's OpCounter
# on these runners (bf16, fp32 factors; the same for every shape and rank).
LEGACY_LAUNCHES = {
    False: {"lora": 16, "khatri_rao": 40, "merged": 35, "hybrid": 43},
    True: {"lora": 20, "khatri_rao": 44, "merged": 45},
}


def current_costs(device: str = "cpu") -> dict[str, float]:
    return cost.cost_constants(torch.device(device).type)


def cell_launches(cell: dict[str, Any]) -> dict[str, int]:
    return cell.get("launches") or LEGACY_LAUNCHES[bool(cell.get("dropout"))]


def auto_choice(cell: dict[str, Any], costs: dict[str, float] | None = None, device: str = "cpu") -> str:
    """What `auto` picks in this cell with the given constants (default: the ones abba.py uses on `device`),
    pricing the launches of the code the cell measured."""
    constants = {**current_costs(device), **{k: v for k, v in (costs or {}).items() if k in COST_NAMES}}
    args = (cell["m"], cell["n"], cell["r1"], cell["r2"], cell["tokens"], cell.get("dropout", False))
    costs_by_path = cost.path_costs(*args, constants=constants, launches=cell_launches(cell))
    return min(costs_by_path, key=costs_by_path.__getitem__)


def measured_paths(cell: dict[str, Any]) -> list[str]:
    return [p for p in PATHS if p in cell["median"]]


def regret(cell: dict[str, Any], choice: str) -> float:
    med = cell["median"]
    return med[choice] / min(med[p] for p in measured_paths(cell)) - 1.0


# Candidate calibrations: log grids around the plain multiply-add count (KR/hybrid/build = 1, no element or launch
# term). The launch axis spans a launch worth 1e5 (a CPU) to 1e11 (a GPU's ~20 us at ~500 TFLOP/s) big-matmul
# multiply-adds; the other axes are coarser than a five-axis fit could afford, to keep the fit under a minute.
FIT_GRID = {
    "KR_COST": [10 ** (k / 100) for k in range(-60, 61, 6)],
    "HYBRID_RATIO": [1.0, 1.2, 1.5],  # HYBRID_COST / KR_COST
    "BUILD_COST": [10 ** (b / 100) for b in range(-100, 151, 25)],
    "ELEMENT_COST": [0.0] + [2.0**j for j in range(0, 11)],
    "KR_ELEMENT_COST": [0.0] + [2.0**j for j in range(0, 11)],
    "LAUNCH_COST": [0.0] + [10 ** (k / 4) for k in range(20, 45, 2)],
}


def fit_costs(cells: list[dict[str, Any]], grid: dict[str, list[float]] | None = None) -> dict[str, float]:
    """The calibration on the grid minimising auto's (worst regret, total regret) over the cells.

    Only the decision boundaries matter, so many constants tie; ties go to the constants closest to the plain
    multiply-add count. Every grid point is evaluated at once (the cost model takes tensors). Cells recorded
    before the hybrid path existed are skipped: `auto` could pick a path they did not measure.
    """
    usable = [c for c in cells if all(p in c["median"] for p in ("khatri_rao", "merged"))]
    usable = [c for c in usable if c.get("dropout") or "hybrid" in c["median"]]
    if not usable:
        raise SystemExit("no cell with every path measured: nothing to fit")
    grid = {"LAUNCH_COST": [0.0], **(grid or FIT_GRID)}  # a grid without a launch axis fits without the term
    names = ["KR_COST", "HYBRID_RATIO", "BUILD_COST", "ELEMENT_COST", "KR_ELEMENT_COST", "LAUNCH_COST"]
    axes = [torch.tensor(grid[name], dtype=torch.float64) for name in names]
    k, ratio, b, e, ke, la = (t.reshape(-1) for t in torch.meshgrid(*axes, indexing="ij"))
    constants = {
        "KR_COST": k,
        "HYBRID_COST": k * ratio,
        "BUILD_COST": b,
        "ELEMENT_COST": e,
        "KR_ELEMENT_COST": ke,
        "LAUNCH_COST": la,
    }
    worst = torch.zeros_like(k)
    total = torch.zeros_like(k)
    for c in usable:
        costs = cost.path_costs(
            c["m"], c["n"], c["r1"], c["r2"], c["tokens"], bool(c.get("dropout")), constants, cell_launches(c)
        )
        names = list(costs)
        picks = torch.stack([costs[p] for p in names]).argmin(0)  # ties: the first listed, as choose_path
        regrets = torch.tensor([regret(c, p) for p in names], dtype=torch.float64)[picks]
        worst = torch.maximum(worst, regrets)
        total += regrets
    # Among the grid points with the least worst regret, take the one whose neighbourhood (one step along every
    # axis) has the least worst regret too: not a point on a decision boundary that a cell's noise straddles, where
    # rounding the constants or a little machine drift flips a decision.
    shape = [len(a) for a in axes]
    robust = worst.reshape(shape)
    for dim in range(robust.dim()):
        padded = torch.cat([robust.narrow(dim, 0, 1), robust, robust.narrow(dim, shape[dim] - 1, 1)], dim)
        robust = torch.stack([padded.narrow(dim, j, shape[dim]) for j in range(3)]).amax(0)
    robust = robust.reshape(-1)
    simplicity = k.log().abs() + ratio.log() + b.log().abs() + e + ke + la.clamp(min=1).log()
    # lexicographic: own worst (to 0.1%), neighbourhood worst, total, simplicity
    candidates = torch.arange(len(k))
    for crit in (worst.mul(1000).round(), robust.mul(1000).round(), total.mul(1000).round(), simplicity):
        values = crit[candidates]
        candidates = candidates[values == values.min()]
    i = int(candidates[0])
    fitted = {name: round(float(v[i]), 3) for name, v in constants.items()}
    # What goes into abba.py are these rounded constants: report their regret, not the grid point's.
    check = max(regret(c, auto_choice(c, fitted)) for c in usable)
    return {
        **fitted,
        "worst_regret": round(check, 4),
        "neighbourhood_worst_regret": round(float(robust[i]), 4),
        "cells": len(usable),
    }


def to_markdown(
    cells: list[dict[str, Any]], costs: dict[str, float] | None = None, device: str = "cpu"
) -> str:
    """The cell table; `auto picks` uses `costs` (those the run recorded) or else the current constants."""
    short = {"khatri_rao": "KR", "merged": "merged", "hybrid": "hybrid"}
    headers = [
        "layer (m x n)",
        "r (r1=r2)",
        "T",
        "dropout",
        "LoRA ms",
        "KR ms",
        "merged ms",
        "hybrid ms",
        "auto picks",
        "auto regret",
        "auto / LoRA",
        "peak MiB LoRA / KR / merged / hybrid",
        "rep",
    ]
    rows = []
    for c in cells:
        med, mem = c["median"], c["peak_bytes"]
        choice = auto_choice(c, costs, device)
        known = choice in med  # a sweep recorded before the hybrid path existed cannot say
        rows.append(
            [
                f"{c['shape']} ({c['m']}x{c['n']})",
                f"{c['r']} ({c['r1']})",
                c["tokens"],
                "0.05" if c.get("dropout") else "-",
                *(f"{med[k] * 1e3:.1f}" if k in med else "-" for k in ("lora", *PATHS)),
                short[choice],
                f"{regret(c, choice):+.1%}" if known else "?",
                f"{med[choice] / med['lora']:.2f}" if known else "?",
                " / ".join(f"{common.mib(mem[k]):.0f}" if k in mem else "-" for k in ("lora", *PATHS)),
                c["repeats"],
            ]
        )
    return common.md_table(headers, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.arg_parser(__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(common.DTYPES), default="fp32")
    p.add_argument("--quick", action="store_true", help="the subset make bench runs")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES))
    p.add_argument("--ranks", nargs="+", type=int)
    p.add_argument("--tokens", nargs="+", type=int)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--budget", type=float, default=2.5e10, help="multiply-adds per cell before cutting repeats"
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dropout", action="store_true", help="run every cell with adapter dropout as well")
    p.add_argument("--no-plain", action="store_true", help="with --dropout: only the dropout cells")
    p.add_argument("--fit", action="store_true", help="fit the cost-model constants to the measured cells")
    p.add_argument("--refit", nargs="+", type=Path, help="fit on recorded sweep JSONs instead of measuring")
    p.add_argument(
        "--launch-cost",
        type=float,
        help="hold the launch term at this value (big-matmul multiply-adds per launch) instead of fitting it",
    )
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def refit(
    paths: list[Path], grid: dict[str, list[float]] | None = None, out: Path | None = None
) -> dict[str, Any]:
    """Fit on recorded sweeps; a cell measured again in a later file (more repeats) replaces the earlier one.

    With `out`, writes the merged cells with the fitted constants as the sweep's cost model (what
    `run_cpu.py --record` renders: `auto picks` are then the fitted model's picks)."""
    by_key: dict[tuple, dict[str, Any]] = {}
    first: dict[str, Any] | None = None
    for path in paths:
        res = json.loads(path.read_text())
        first = first or res
        for c in res["cells"]:
            by_key[(c["m"], c["n"], c["r"], c["tokens"], bool(c.get("dropout")))] = c
    cells = list(by_key.values())
    fit = fit_costs(cells, grid)
    constants = {k: fit[k] for k in COST_NAMES}
    print(to_markdown(cells, constants))
    print(f"\nfit over {fit['cells']} cells: " + ", ".join(f"{k}={v:.3g}" for k, v in fit.items()))
    merged = {
        "config": {"refit": [str(p) for p in paths]},
        "machine": (first or {}).get("machine", {}),
        "cost_model": constants,
        "cells": cells,
        "auto_worst_regret": max(regret(c, auto_choice(c, constants)) for c in cells),
        "fit": fit,
    }
    if out:
        common.write_json(out, merged)
    return merged


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    grid = FIT_GRID if args.launch_cost is None else {**FIT_GRID, "LAUNCH_COST": [args.launch_cost]}
    if args.refit:
        return refit(args.refit, grid, out=args.out)
    if args.device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc reads these at start-up: re-exec so RSS follows live tensors (see common.py).
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **common.MEASURE_ENV})
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else list(SHAPES))
    ranks = args.ranks or (QUICK_RANKS if args.quick else RANKS)
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    dropouts = ([] if args.no_plain else [False]) + ([True] if args.dropout else [])
    cells = []
    for name in shapes:
        m, n = SHAPES[name]
        for r in ranks:
            for t in tokens:
                for dropout in dropouts:
                    cell = run_cell(name, m, n, r, t, args, dropout)
                    cells.append(cell)
                    c = auto_choice(cell, device=args.device)
                    print(
                        f"{name} r={r} T={t}{' dropout' if dropout else ''}: "
                        + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in cell["median"].items())
                        + f"; auto={c} regret {regret(cell, c):+.1%}",
                        file=sys.stderr,
                        flush=True,
                    )
                    if args.out:  # keep what was measured should a long sweep be cut short
                        common.write_json(args.out.with_suffix(".partial.json"), {"cells": cells})
    res: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": common.machine_info(args.device),
        "cost_model": current_costs(args.device),
        "cells": cells,
        "auto_worst_regret": max(regret(c, auto_choice(c, device=args.device)) for c in cells),
    }
    if args.fit:
        res["fit"] = fit_costs(cells, grid)
        print("fit: " + ", ".join(f"{k} = {v:.3g}" for k, v in res["fit"].items()), file=sys.stderr)
    if args.out:
        common.write_json(args.out, res)
        args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(to_markdown(cells, device=args.device))
    print(f"\nauto's worst regret with the current constants: {res['auto_worst_regret']:+.1%}")
    return res


if __name__ == "__main__":
    main()
