"""What `abba inspect` prints and draws: a table per run by module type and depth, a side-by-side summary, a PNG."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from abba_cli.analysis.spectra import ENERGY, effective_rank, energy_rank, expand_runs, inspect_run
from abba_cli.config import DEFAULT_TARGETS
from abba_cli.errors import UserError
from abba_cli.util.files import atomic_write_json, check_output_dir

if TYPE_CHECKING:
    from abba_cli.analysis.spectra import LayerStats, RunReport

DEPTH_GROUPS = 4  # the table's depth columns: layers split into this many contiguous groups


def module_types(layers: list[LayerStats]) -> list[str]:
    """Module types in the usual order (attention q, k, v, o, then the MLP), unknown ones after, by name."""
    found = {layer.module_type for layer in layers}
    return [t for t in DEFAULT_TARGETS if t in found] + sorted(found - set(DEFAULT_TARGETS))


def _by_type(layers: list[LayerStats]) -> dict[str, list[LayerStats]]:
    return {t: [x for x in layers if x.module_type == t] for t in module_types(layers)}


def _depth_groups(layers: list[LayerStats]) -> list[list[int]]:
    depths = sorted({d for d in (layer.depth for layer in layers) if d is not None})
    k = min(DEPTH_GROUPS, len(depths))
    return [list(map(int, g)) for g in np.array_split(np.array(depths), k)] if k else []


def format_report(report: RunReport) -> str:
    """One run: rows = module type; columns = mean effective rank per depth group, its range, the mean
    90%-energy rank and the mean ||dW||/||W0||."""
    groups = _depth_groups(report.layers)
    heads = [f"L{g[0]}-{g[-1]}" if len(g) > 1 else f"L{g[0]}" for g in groups]
    lines = [
        f"{report.run}: {report.method} ({report.settings}), {report.trainable:,} trainable, "
        f"{len(report.layers)} layers, {report.seconds:.1f} s"
    ]
    if report.val:
        lines[0] += (
            f"; val_loss best {report.val['best_val_loss']:.4f}, last {report.val['last_val_loss']:.4f}"
        )
    header = ["module", "bound", *[f"erank {h}" for h in heads], "erank min-max", "90% rank", "|dW|/|W0|"]
    rows = [header]
    for kind, layers in _by_type(report.layers).items():
        eranks = [effective_rank(x.singular_values) for x in layers]
        cells = [kind, _span([x.rank_bound for x in layers], "{:d}")]
        for g in groups:
            vals = [e for x, e in zip(layers, eranks, strict=True) if x.depth in g]
            cells.append(f"{statistics.mean(vals):.1f}" if vals else "-")
        cells.append(f"{min(eranks):.1f}-{max(eranks):.1f}")
        cells.append(f"{statistics.mean(energy_rank(x.singular_values) for x in layers):.1f}")
        rel = [x.dw_norm / x.w0_norm for x in layers if x.w0_norm]
        cells.append(f"{statistics.mean(rel):.4f}" if rel else "-")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += [
        "  "
        + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    return "\n".join(lines)


def _span(values: list[int], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"


def summary_rows(reports: list[RunReport]) -> list[dict]:
    """Per run: medians over layers of effective rank, 90% rank and ||dW||/||W0||, with its validation loss."""
    rows = []
    for r in reports:
        eranks = [effective_rank(x.singular_values) for x in r.layers]
        rel = [x.dw_norm / x.w0_norm for x in r.layers if x.w0_norm]
        rows.append(
            {
                "run": str(r.run),
                "method": r.method,
                "trainable_params": r.trainable,
                "effective_rank_median": statistics.median(eranks),
                "effective_rank_min": min(eranks),
                "effective_rank_max": max(eranks),
                "energy_rank_90_median": statistics.median(energy_rank(x.singular_values) for x in r.layers),
                "rel_norm_median": statistics.median(rel) if rel else None,
                "best_val_loss": (r.val or {}).get("best_val_loss"),
                "last_val_loss": (r.val or {}).get("last_val_loss"),
            }
        )
    return rows


def format_summary(reports: list[RunReport]) -> str:
    out = [
        "| run | method | trainable | eff. rank, median (min-max) | 90% rank, median | dW/W0, median | best val_loss |"
    ]
    out.append("|---|---|---:|---:|---:|---:|---:|")
    for s in summary_rows(reports):
        rel = f"{s['rel_norm_median']:.4f}" if s["rel_norm_median"] is not None else "-"
        val = f"{s['best_val_loss']:.4f}" if s["best_val_loss"] is not None else "-"
        out.append(
            f"| {Path(s['run']).name} | {s['method']} | {s['trainable_params']:,} | "
            f"{s['effective_rank_median']:.1f} ({s['effective_rank_min']:.1f}-{s['effective_rank_max']:.1f}) | "
            f"{s['energy_rank_90_median']:g} | {rel} | {val} |"
        )
    return "\n".join(out)


def plot_reports(reports: list[RunReport], path: Path) -> None:
    """Top row: normalised spectra sigma_i / sigma_1 of every layer, one panel per module type; bottom row:
    effective rank by depth. One colour per run, so runs sit side by side in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = module_types([x for r in reports for x in r.layers])
    fig, axes = plt.subplots(2, len(kinds), figsize=(3.2 * len(kinds) + 1, 6.4), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for col, kind in enumerate(kinds):
        top, bottom = axes[0][col], axes[1][col]
        for i, r in enumerate(reports):
            color, label = colors[i % len(colors)], f"{Path(r.run).name} ({r.method})"
            layers = [x for x in r.layers if x.module_type == kind]
            for j, x in enumerate(layers):
                sv = x.singular_values
                if sv.size:
                    top.semilogy(
                        np.arange(1, sv.size + 1),
                        sv / sv[0],
                        color=color,
                        alpha=0.3,
                        lw=0.8,
                        label=label if j == 0 else None,
                    )
            pts = sorted((x.depth, effective_rank(x.singular_values)) for x in layers if x.depth is not None)
            if pts:
                bottom.plot(*zip(*pts, strict=True), "o-", color=color, ms=3, label=label)
        top.set(title=kind, xlabel="index i", ylabel="sigma_i / sigma_1" if col == 0 else None)
        bottom.set(xlabel="layer (depth)", ylabel="effective rank" if col == 0 else None)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("singular values of dW per module type (top), entropy effective rank by depth (bottom)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_inspect(runs: list[Path], out: Path, base: Path | None = None) -> list[RunReport]:
    """`abba inspect`: every run's table and a side-by-side summary on stdout, OUT/inspect.json, OUT/inspect.png."""
    if not runs:
        raise UserError("abba inspect: give at least one run directory")
    out = check_output_dir(out)
    reports = []
    for run in expand_runs(runs):
        reports.append(inspect_run(run, base))
        print(format_report(reports[-1]))
    print(format_summary(reports))
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "energy_fraction": ENERGY,
        "summary": summary_rows(reports),
        "runs": [r.as_json() for r in reports],
    }
    atomic_write_json(out / "inspect.json", data)
    plot_reports(reports, out / "inspect.png")
    print(f"written: {out / 'inspect.json'}, {out / 'inspect.png'}")
    return reports
