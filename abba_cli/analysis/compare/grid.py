"""`abba compare`: every (method, seed) trained and evaluated through the product's own train and eval code.

The folder's layout is analysis/compare/folder.py's; the table and curves are table.py's.

Resumable by rerunning the same command: a finished run (final adapter or model saved, same config) is kept, an
interrupted one resumes from its latest checkpoint (`train.save_every`; without one it restarts from step 0),
evaluation continues where it stopped. Under a multi-process launcher every process trains and evaluates every
run in turn (each run uses all processes); the table is written by the main process alone.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from abba_cli.analysis.compare.budget import format_budget, parse_methods, plan_methods, split_sets
from abba_cli.analysis.compare.folder import RESOURCES, TABLE, config_path, run_dir, run_name
from abba_cli.analysis.compare.paper_figures import paper_table
from abba_cli.analysis.compare.sweep import parse_sweeps
from abba_cli.analysis.compare.table import write_outputs
from abba_cli.config import RunConfig, apply_overrides, dump_config, validate_config
from abba_cli.errors import UserError
from abba_cli.run.layout import has_final_output
from abba_cli.train.run_sequence import one_process_group
from abba_cli.util.files import atomic_write_text
from abba_cli.util.yaml_file import read_yaml


# The product's train and eval entry points, imported here and only here.
def _train(cfg: RunConfig, config_path: Path, resume: bool) -> None:
    from abba_cli.train.pipeline import run_training

    run_training(cfg, config_path=config_path, resume=resume)


def _evaluate(run_dir: Path) -> None:
    from abba_cli.eval.evaluate import run_eval

    run_eval(tasks=[], run=run_dir, resume=True)  # the run's own eval section; finished results are reused


def _is_main() -> bool:
    # torchrun and accelerate launch both set RANK; a plain process is the main one.
    return int(os.environ.get("RANK", "0")) == 0


def check_comparable(cfg: RunConfig, source: str) -> None:
    """A comparison needs held-out loss and held-out questions: refuse a config that has neither."""
    if cfg.data.val_samples is None and cfg.data.val_path is None:
        raise UserError(
            f"{source}: abba compare needs validation data: set data.val_samples (hold examples out of the "
            "training source) or data.val_path, e.g. --set data.val_samples=64"
        )
    if not cfg.eval.tasks:
        raise UserError(
            f"{source}: abba compare needs eval.tasks (the held-out questions), e.g. --set eval.tasks=[piqa,obqa]"
        )


def run_compare(
    config: Path,
    methods: str,
    seeds: int,
    out: Path,
    sets: list[str],
    sweeps: list[str] | None = None,
    paper: str | None = None,
) -> Path:
    """Plan, train, evaluate, tabulate; returns OUT/compare.md. `sweeps`: --sweep KEY=V1,V2 (a grid of rows);
    `paper`: a table of the paper's figures (compare.paper_figures) to print beside ours."""
    method_list = parse_methods(methods)
    grid = parse_sweeps(sweeps or [])
    if paper is not None:
        paper_table(paper)  # an unknown name is refused before anything trains
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: give at least 1")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a directory")
    common, per_method = split_sets(sets, method_list)
    if not Path(config).is_file():
        raise UserError(f"{config}: config file not found")
    raw = read_yaml(Path(config))
    if not isinstance(raw, dict):
        raise UserError(f"{config}: not a run config file (a YAML mapping of model, adapter, data, ...)")
    apply_overrides(raw, common)
    cfg = validate_config(raw, str(config))
    check_comparable(cfg, str(config))
    plans = plan_methods(raw, str(config), method_list, per_method, grid)
    if _is_main():
        print(format_budget(plans, cfg))
    jobs = [(plan, seed) for seed in range(1, seeds + 1) for plan in plans]  # seed 1 of every method first
    runs = [_seeded(plan.raw, plan.row, seed, out) for plan, seed in jobs]
    for run_cfg, _ in runs:
        run_state(run_cfg)  # refuses a folder of other settings now, not after the runs before it
    with one_process_group() as fresh_state:
        for i, ((plan, seed), (run_cfg, path)) in enumerate(zip(jobs, runs, strict=True), 1):
            if _is_main():
                print(f"[{i}/{len(jobs)}] {run_name(plan.row, seed)}: {plan.describe}", file=sys.stderr)
            train_one(run_cfg, path, fresh_state)
        # Every process evaluates each run too (eval shares the prompts out); the main process writes.
        for plan, seed in jobs:
            folder = run_dir(out, run_name(plan.row, seed))
            if not _eval_done(folder, plan.cfg.eval.tasks):
                _evaluate(folder)
    if not _is_main():
        return out / TABLE
    return write_outputs(out, config, plans, seeds, paper)


def _seeded(raw: dict, method: str, seed: int, out: Path) -> tuple[RunConfig, Path]:
    """The method's config with train.seed = data.seed = seed (each seed its own data order and validation
    split, shared by every method) and its run directory under OUT; written to OUT/configs/."""
    raw = copy.deepcopy(raw)
    name = run_name(method, seed)
    raw.setdefault("train", {})["seed"] = seed
    raw.setdefault("data", {})["seed"] = seed
    raw["output_dir"] = str(run_dir(out, name))  # set, not parsed as YAML: any path works
    cfg = validate_config(raw, f"{method} seed {seed}")
    path = config_path(out, name)
    if _is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, dump_config(cfg))
    return cfg, path


def run_state(cfg: RunConfig) -> str:
    """'finished', 'interrupted' or 'new'; UserError when the folder holds a run of other settings (checked for
    every run before anything trains, so a mismatch is not found hours in)."""
    from abba_cli.run.layout import CONFIG_FILE, read_saved_config
    from abba_cli.run.training_dir import RESUME_MAY_CHANGE, diff_keys, is_empty_run_dir

    run_dir = Path(cfg.output_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        if not is_empty_run_dir(run_dir):
            raise UserError(
                f"{run_dir}: holds files but no {CONFIG_FILE}, so it is no run to resume; remove it and rerun"
            )
        return "new"
    saved = read_saved_config(run_dir)
    diffs = [k for k in diff_keys(saved, cfg.model_dump(mode="json")) if not k.startswith(RESUME_MAY_CHANGE)]
    if diffs:
        raise UserError(
            f"{run_dir} was trained with other settings ({', '.join(diffs)}); give another --out, or remove "
            "that run to train it again"
        )
    return "finished" if has_final_output(run_dir) else "interrupted"


def train_one(cfg: RunConfig, config_path: Path, fresh_state: Callable[[], None]) -> None:
    """Keep a finished run, resume an interrupted one (from its latest checkpoint), else start it
    (`fresh_state`: run_sequence.one_process_group's reset before each run)."""
    state = run_state(cfg)
    run_dir = Path(cfg.output_dir)
    if state == "finished":
        if _is_main():
            print(f"kept (finished): {run_dir}", file=sys.stderr)
        return
    resume = state == "interrupted"
    gc.collect()  # what an earlier run left behind should not count in this run's peak
    fresh_state()
    with PeakMemory() as peak:
        _train(cfg, config_path, resume)
    if _is_main():
        record = {"peak_memory_bytes": peak.bytes, "memory_kind": peak.kind, "resumed": resume}
        atomic_write_text(run_dir / RESOURCES, json.dumps(record, indent=2) + "\n")


def _eval_done(run_dir: Path, tasks: list[str]) -> bool:
    from abba_cli.eval.results import run_eval_dir, task_finished

    return all(task_finished(run_eval_dir(run_dir), t) for t in tasks)


class PeakMemory:
    """Peak memory of this process during the block: CUDA's max allocated bytes on every GPU it used, else the
    peak resident set size (Linux: VmHWM, reset through /proc/self/clear_refs); None where neither exists."""

    def __init__(self) -> None:
        self.bytes: int | None = None
        self.kind: str | None = None

    def __enter__(self) -> PeakMemory:
        import torch

        if torch.cuda.is_available():
            for d in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(d)
            self.kind = "cuda_max_allocated"
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                self.kind = "peak_rss"
            except OSError:
                self.kind = None
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.kind == "cuda_max_allocated":
            self.bytes = sum(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))
        elif self.kind == "peak_rss":
            m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            self.bytes = int(m.group(1)) * 1024 if m else None
