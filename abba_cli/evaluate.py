"""`abba eval`: generate answers for benchmark tasks with a run's adapter (or a plain model) and score them.

Protocol (docs/ARCHITECTURE section 4): prompts from `render_prompt` only, greedy decoding, batched with left
padding and an attention mask, stop strings, per-task max_new_tokens, the adapter merged into the base weights
in memory first so generation runs at the base model's speed. Every prediction goes to
`<out>/<task>/predictions.jsonl`, the summary to `<out>/<task>/metrics.json`; each task owns its folder, so
evaluating one task never touches another's results.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from abba_cli.errors import UserError
from abba_cli.fsutil import atomic_file, atomic_write_json
from abba_cli.prompts import render_prompt
from abba_cli.scoring import score, truncate_at_stop

COMMONSENSE_TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")
TASK_GROUPS = {"commonsense": COMMONSENSE_TASKS}
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class TaskResult:
    task: str
    n: int
    correct: int
    invalid: int
    seconds: float
    out_dir: Path

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass
class _Target:
    """What is being evaluated and where its results go."""

    model: str  # base or merged model, as given to load_base
    run_dir: Path | None  # adapter run, or None for a plain model
    out_dir: Path
    load_kwargs: dict[str, Any]
    eval_defaults: Any | None  # the run config's `eval` section, when the run has one


# ------------------------------------------------------------------------------------------ tasks


def valid_tasks() -> list[str]:
    from abba_cli.recipes import available_recipes

    return sorted(available_recipes(kind="eval")) + sorted(TASK_GROUPS)


def resolve_tasks(requested: Sequence[str]) -> list[str]:
    """Expand groups (commonsense), drop repeats keeping order; UserError on an unknown name."""
    from abba_cli.recipes import available_recipes

    known = set(available_recipes(kind="eval"))
    tasks: list[str] = []
    for name in requested:
        name = name.strip().lower()
        expanded = TASK_GROUPS.get(name, (name,))
        for task in expanded:
            if task not in known:
                raise UserError(f"--task {name!r}: unknown task; valid: {', '.join(valid_tasks())}")
            if task not in tasks:
                tasks.append(task)
    return tasks


# ------------------------------------------------------------------------------------------ target


def _model_dir_name(model: str) -> str:
    """A folder name for a model path or hub id: its last component."""
    return Path(model.rstrip("/")).name or "model"


def _run_config(run_dir: Path) -> Any | None:
    """The run's resolved config.yaml (model settings and eval defaults), if it has one."""
    from abba_cli.config import load_config

    path = run_dir / "config.yaml"
    return load_config(path) if path.is_file() else None


def _resolve_target(run: Path | None, model: str | None, out: Path | None) -> _Target:
    from abba_cli.runs import resolve_run

    if model is not None and run is None:
        # A base or merged model on its own: there is no run directory to hold the results.
        out_dir = out if out is not None else Path("eval-results") / _model_dir_name(model)
        return _Target(model, None, out_dir, {}, None)

    from abba_cli.adapters import read_adapter_config
    from abba_cli.runs import full_model_dir

    run_dir = resolve_run(run, allow_full=True)
    cfg = _run_config(run_dir)
    trained = full_model_dir(run_dir)
    if trained is not None:
        # Full fine-tuning: the run holds the trained model itself; there is no adapter to put on another base.
        if model is not None:
            raise UserError(
                f"--run {run_dir} is a full fine-tuning run (its model is {trained}); pass --run or --model, not both"
            )
        load_kwargs = {}
        if cfg is not None:
            load_kwargs = dict(
                dtype=cfg.model.dtype,
                trust_remote_code=cfg.model.trust_remote_code,
                attn_implementation=cfg.model.attn_implementation,
            )
        out_dir = out if out is not None else run_dir / "eval"
        return _Target(str(trained), None, out_dir, load_kwargs, cfg.eval if cfg else None)
    base = read_adapter_config(run_dir)["base_model"]
    load_kwargs: dict[str, Any] = {}
    if cfg is not None and (model is None or model == cfg.model.name_or_path):
        m = cfg.model
        load_kwargs = dict(
            dtype=m.dtype,
            trust_remote_code=m.trust_remote_code,
            revision=m.revision,
            attn_implementation=m.attn_implementation,
        )
    if model is None or model == base:
        out_dir = out if out is not None else run_dir / "eval"
        return _Target(base, run_dir, out_dir, load_kwargs, cfg.eval if cfg else None)
    # The adapter on another base: keep those results apart from the run's own evaluation.
    out_dir = out if out is not None else run_dir / f"eval-on-{_model_dir_name(model)}"
    return _Target(model, run_dir, out_dir, load_kwargs, cfg.eval if cfg else None)


def load_model_for_eval(target_model: str, run_dir: Path | None, load_kwargs: dict[str, Any] | None = None):
    """(model, tokenizer, device): the base with the run's adapter merged in and unwrapped."""
    import torch

    from abba_cli.models import load_base

    model, tokenizer = load_base(target_model, **(load_kwargs or {}))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and model.dtype == torch.float16:
        # fp16 kernels are slow or missing on CPUs. bf16 is kept: with avx512_bf16 it was measured 1.5-2x
        # faster than fp32 here (SmolLM2-135M, 5 GSM8K prompts x 32 tokens: 9.4 s vs 13.9 s).
        model = model.float()
    if run_dir is not None:
        from abba_cli.adapters import load_adapter, merge_adapters, unwrap_adapters

        try:
            load_adapter(model, run_dir)
        except UserError:
            raise
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"--run {run_dir}: its adapter does not fit the model {target_model} ({first})"
            ) from None
        # Fold dW into W0 and drop the wrappers: generation then costs exactly what the base model costs.
        merge_adapters(model)
        unwrap_adapters(model)
    model.to(device)
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only batching: prompts end where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, device


# ------------------------------------------------------------------------------------------ generation


def _generation_config(model, tokenizer, max_new_tokens: int, stop: Sequence[str]):
    """Greedy decoding on top of the model's own config (keeps its eos ids), sampling knobs cleared."""
    import copy

    gen = copy.deepcopy(model.generation_config)
    gen.do_sample = False
    gen.num_beams = 1
    gen.temperature = None
    gen.top_p = None
    gen.top_k = None
    gen.max_length = None
    gen.max_new_tokens = max_new_tokens
    gen.stop_strings = list(stop) or None
    gen.pad_token_id = tokenizer.pad_token_id
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    return gen


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    device=None,
    desc: str = "generate",
) -> list[str]:
    """Greedy completions of `prompts`, in order, each cut at its first stop string.

    Prompts are sorted by token length (longest first, so memory problems show in the first batch) and batched
    with left padding and an attention mask; the outputs are put back in the input order.
    """
    import torch
    from tqdm.auto import tqdm

    device = device or next(model.parameters()).device
    gen_cfg = _generation_config(model, tokenizer, max_new_tokens, stop)
    encoded = tokenizer(list(prompts))["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)
    new_tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=len(prompts), desc=desc, unit="ex", file=sys.stderr, dynamic_ncols=True)
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.generate(**batch, generation_config=gen_cfg, tokenizer=tokenizer)
            gen_ids = out[:, batch["input_ids"].shape[1] :]
            new_tokens += int((gen_ids != tokenizer.pad_token_id).sum())
            for i, text in zip(idx, tokenizer.batch_decode(gen_ids, skip_special_tokens=True), strict=True):
                outputs[i] = truncate_at_stop(text, stop)
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):.1f}")
    bar.close()
    return outputs


# ------------------------------------------------------------------------------------------ one task


def _answer_spec(recipe) -> tuple[str, list[str]]:
    answer = recipe.answer
    if answer is None:
        raise UserError(f"recipe {recipe.name!r} has no answer section; only eval recipes can be evaluated")
    return answer.type, list(answer.labels or [])


def evaluate_task(
    model,
    tokenizer,
    task: str,
    out_dir: Path,
    *,
    limit: int | None = None,
    skip: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int | None = None,
    device=None,
    meta: dict[str, Any] | None = None,
) -> TaskResult:
    """Generate, score and write `<out_dir>/<task>/predictions.jsonl` and `metrics.json`."""
    from abba_cli.recipes import load_examples, load_recipe

    recipe = load_recipe(task)
    answer_type, choices = _answer_spec(recipe)
    # --limit takes the first N (after --skip) in the source's fixed order, not a random subset.
    examples = load_examples(recipe, skip=skip, limit=limit)
    stop = list(recipe.generation.stop or [])
    new_tokens = max_new_tokens or recipe.generation.max_new_tokens

    prompts = [render_prompt(ex.instruction, ex.input) for ex in examples]
    start = time.perf_counter()
    outputs = generate(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        max_new_tokens=new_tokens,
        stop=stop,
        device=device,
        desc=task,
    )
    seconds = time.perf_counter() - start

    rows = []
    for ex, prompt, output in zip(examples, prompts, outputs, strict=True):
        if ex.gold is None:
            raise UserError(
                f"task {task}: example {ex.id} has no gold answer; check the recipe's field mapping"
            )
        s = score(answer_type, output, ex.gold, choices)
        rows.append(
            {
                "id": ex.id,
                "prompt": prompt,
                "output": output,
                "extracted": s.extracted,
                "gold": ex.gold,
                "correct": s.correct,
            }
        )
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    invalid = sum(r["extracted"] is None for r in rows)

    task_dir = Path(out_dir) / task
    with atomic_file(task_dir / "predictions.jsonl") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    metrics = {
        "task": task,
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "invalid": invalid,
        **(meta or {}),
        "limit": limit,
        "skip": skip,
        "seconds": round(seconds, 3),
        "examples_per_s": round(n / seconds, 4) if seconds > 0 else None,
        "generation": {
            "do_sample": False,
            "max_new_tokens": new_tokens,
            "stop": stop,
            "batch_size": batch_size,
            "padding_side": "left",
        },
        "answer_type": answer_type,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(task_dir / "metrics.json", metrics)
    return TaskResult(task, n, correct, invalid, seconds, task_dir)


# ------------------------------------------------------------------------------------------ entry point


def format_table(results: Sequence[TaskResult]) -> str:
    width = max([len("task")] + [len(r.task) for r in results])
    lines = [f"{'task':<{width}}  {'n':>6}  {'accuracy':>8}  {'invalid':>7}"]
    for r in results:
        lines.append(f"{r.task:<{width}}  {r.n:>6}  {100 * r.accuracy:>7.2f}%  {r.invalid:>7}")
    return "\n".join(lines)


def run_eval(
    tasks: Sequence[str],
    run: Path | None = None,
    model: str | None = None,
    limit: int | None = None,
    skip: int | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    out: Path | None = None,
) -> list[TaskResult]:
    """Evaluate a run's adapter (merged) or a plain model on `tasks`; print a summary table."""
    import torch

    from abba_cli import __version__

    target = _resolve_target(run, model, out)
    defaults = target.eval_defaults
    if not tasks and defaults is not None and defaults.tasks:
        tasks = defaults.tasks
    if not tasks:
        raise UserError(f"no --task given; valid tasks: {', '.join(valid_tasks())}")
    task_list = resolve_tasks(tasks)
    if defaults is not None:
        # The run's own eval settings (e.g. eval.skip keeping evaluation disjoint from training) apply unless
        # overridden on the command line.
        limit = limit if limit is not None else defaults.limit
        skip = skip if skip is not None else defaults.skip
        batch_size = batch_size or defaults.batch_size
        max_new_tokens = max_new_tokens or defaults.max_new_tokens
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    skip = skip or 0

    model_obj, tokenizer, device = load_model_for_eval(target.model, target.run_dir, target.load_kwargs)
    meta = {
        "model": target.model,
        "adapter_run": str(target.run_dir.resolve()) if target.run_dir else None,
        "device": str(device),
        "dtype": str(model_obj.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "abba_cli": __version__,
    }
    results = []
    for task in task_list:
        results.append(
            evaluate_task(
                model_obj,
                tokenizer,
                task,
                target.out_dir,
                limit=limit,
                skip=skip,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                device=device,
                meta=meta,
            )
        )
    print(format_table(results))
    print(f"results: {target.out_dir}")
    return results
