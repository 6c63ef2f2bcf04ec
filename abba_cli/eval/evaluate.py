"""`abba eval`: generate answers for benchmark tasks with a run's adapter (or a plain model) and score them.

Protocol (docs/ARCHITECTURE section 4, README "Evaluation"): prompts from `render_prompt` only (the training
prompt; `--protocol paper` adds the references' response prefix and token budget), greedy decoding
(eval/generate.py), the adapter merged into the base weights in memory first (eval/target.py). Predictions are
written as they finish (eval/results.py); each task owns its folder `<out>/<task>/` (`predictions.jsonl`,
`metrics.json`), so evaluating one task never touches another's results.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from abba_cli.data.prompts import render_prompt
from abba_cli.errors import UserError
from abba_cli.eval import results as eval_results
from abba_cli.eval.batch_size import default_batch_size
from abba_cli.eval.generate import generate_batches, generation_settings, greedy_generation_config
from abba_cli.eval.processes import EvalProcesses, eval_processes
from abba_cli.eval.results import TaskResult, format_table
from abba_cli.eval.scoring import score
from abba_cli.eval.target import load_model_for_eval, resolve_target, train_prompt_renderer
from abba_cli.eval.tasks import (
    PROTOCOLS,
    TaskProtocol,
    answer_spec,
    build_prompt,
    resolve_tasks,
    select_examples,
    task_protocol,
    valid_tasks,
)
from abba_cli.util.files import check_output_dir
from abba_cli.util.signals import GracefulStop, TrainingStopped, signal_name


class EvalStopped(TrainingStopped):
    """Eval stopped on SIGINT/SIGTERM after its current batch; the CLI exits with 128 + the signal number."""


class _EvalGracefulStop(GracefulStop):
    """GracefulStop with eval's wording: the first signal lets the running batch finish, a second stops at once."""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            super()._handle(signum, frame)  # second signal: KeyboardInterrupt now
        self.signum = signum
        print(
            f"\nreceived {signal_name(signum)}: finishing the current batch; finished predictions are on disk "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


def _prediction(ex, prompt: str, output: str, answer_type: str, choices: list[str]) -> dict[str, Any]:
    if ex.gold is None:
        raise UserError(f"example {ex.id} has no gold answer; check the recipe's field mapping")
    s = score(answer_type, output, ex.gold, choices)
    return {
        "id": ex.id,
        "prompt": prompt,
        "output": output,
        "extracted": s.extracted,
        "gold": ex.gold,
        "correct": s.correct,
    }


def _resume_key(model, meta: dict, batch_size: int, proto: TaskProtocol, gen: dict, source) -> dict[str, Any]:
    """Everything a stored prediction depends on besides its example: --resume reuses rows only if it matches."""
    return {
        "model": meta.get("model"),
        "adapter_run": meta.get("adapter_run"),
        "dtype": str(model.dtype).removeprefix("torch."),
        "batch_size": batch_size,  # bf16 outputs depend on it (see README, batch invariance)
        "protocol": proto.name,
        "response_prefix": proto.response_prefix,
        "generation": gen,
        "data_source": {
            k: source.as_dict()[k] for k in ("kind", "id", "split", "config", "revision", "rows")
        },
    }


def evaluate_task(
    model,
    tokenizer,
    task: str,
    out_dir: Path,
    *,
    limit: int | None = None,
    skip: int = 0,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    device=None,
    processes: EvalProcesses | None = None,
    meta: dict[str, Any] | None = None,
    protocol: str = "ours",
    resume: bool = False,
    overwrite: bool = False,
    stop_request: GracefulStop | None = None,
    render: Callable[[str, str | None], str] = render_prompt,
) -> TaskResult:
    """Generate, score and write `<out_dir>/<task>/predictions.jsonl` and `metrics.json`, appending each
    finished batch to a partial file first (see abba_cli.eval.results).

    Under a launcher each process generates its share of the prompts (`processes`); the main process writes
    the results. `batch_size` None: chosen for the device (abba_cli.eval.batch_size)."""
    from abba_cli.data.recipes import load_recipe

    recipe = load_recipe(task)
    answer_type, choices = answer_spec(recipe)
    task_dir = Path(out_dir) / task
    eval_results.refuse_existing(task_dir, resume=resume, overwrite=overwrite)
    examples, source = select_examples(recipe, skip=skip, limit=limit)
    proto = task_protocol(recipe, protocol, max_new_tokens)
    processes = processes or EvalProcesses(0, 1, device or next(model.parameters()).device)
    all_prompts = [build_prompt(ex.instruction, ex.input, proto, render) for ex in examples]
    lengths = [len(ids) for ids in tokenizer(all_prompts)["input_ids"]] if all_prompts else []
    if batch_size is None:  # from every example, not the ones left: a resumed run picks the same size
        batch_size = default_batch_size(
            model, processes.device, max(lengths, default=1), proto.max_new_tokens
        )
    gen = generation_settings(greedy_generation_config(model, tokenizer, proto.max_new_tokens, proto.stop))
    key = _resume_key(model, meta or {}, batch_size, proto, gen, source)
    done = eval_results.reusable_predictions(task_dir, key) if resume else {}
    left = [i for i, ex in enumerate(examples) if ex.id not in done]
    mine = [left[j] for j in processes.share([lengths[i] for i in left])]
    todo = [examples[i] for i in mine]
    prompts = [all_prompts[i] for i in mine]
    if processes.is_main and not resume:
        eval_results.drop_partials(task_dir)
    processes.barrier()  # every process has read (or dropped) the old files before any writes its own

    start = time.perf_counter()
    with eval_results.PartialPredictions(task_dir, key, fresh=not resume, rank=processes.rank) as partial:
        new_rows: list[dict] = []
        try:
            for batch in generate_batches(
                model,
                tokenizer,
                prompts,
                batch_size=batch_size,
                max_new_tokens=proto.max_new_tokens,
                stop=proto.stop,
                device=device,
                desc=task,
            ):
                rows = [_prediction(todo[i], prompts[i], text, answer_type, choices) for i, text in batch]
                partial.append(rows)
                new_rows.extend(rows)
                if stop_request is not None and stop_request.requested and len(new_rows) < len(todo):
                    raise EvalStopped(
                        f"eval stopped by {signal_name(stop_request.signum)}", stop_request.signum
                    )
        except (EvalStopped, KeyboardInterrupt):
            eval_results.say_kept(task_dir, len(examples) - len(left) + len(new_rows), len(examples))
            raise
    seconds = time.perf_counter() - start
    shares = processes.gather(new_rows)
    new_rows = [r for share in shares for r in share]

    # Re-score every kept output against the current gold: a resumed row is scored like a new one.
    stored = {**done, **{r["id"]: r for r in new_rows}}
    rows = [
        _prediction(ex, stored[ex.id]["prompt"], stored[ex.id]["output"], answer_type, choices)
        for ex in examples
    ]
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    invalid = sum(r["extracted"] is None for r in rows)
    metrics = {
        "task": task,
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "invalid": invalid,
        **(meta or {}),
        "dtype": key["dtype"],
        "batch_size": batch_size,
        "protocol": proto.name,
        "response_prefix": proto.response_prefix,
        "limit": limit,
        "skip": skip,
        "generated": len(left),
        "resumed": n - len(left),
        "processes": processes.count,
        "generated_per_process": [len(share) for share in shares],
        "seconds": round(seconds, 3),
        "examples_per_s": round(len(left) / seconds, 4) if seconds > 0 and left else None,
        "generation": {**gen, "batch_size": batch_size, "padding_side": "left"},
        "data_source": source.as_dict(),
        "answer_type": answer_type,
        "resume_key": key,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if processes.is_main:
        eval_results.finalize(task_dir, rows, metrics)
    processes.barrier()  # the results exist for every process once evaluate_task returns
    return TaskResult(task, n, correct, invalid, seconds, task_dir)


def run_eval(
    tasks: Sequence[str],
    run: Path | None = None,
    model: str | None = None,
    limit: int | None = None,
    skip: int | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    out: Path | None = None,
    protocol: str = "ours",
    resume: bool = False,
    overwrite: bool = False,
    base: Path | None = None,
) -> list[TaskResult]:
    """Evaluate a run's adapter (merged) or a plain model on `tasks`; print a summary table.

    Everything that can be refused (unknown task or protocol, an unusable --out, results that would be
    replaced) is refused before the model loads."""
    import torch

    from abba_cli import __version__

    target = resolve_target(run, model, out, base)
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
    skip = skip or 0
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    check_output_dir(Path(target.out_dir))
    for task in task_list:
        eval_results.refuse_existing(Path(target.out_dir) / task, resume=resume, overwrite=overwrite)

    processes = eval_processes()
    model_obj, tokenizer, device = load_model_for_eval(
        target.model, target.run_dir, target.load_kwargs, device=processes.device
    )
    # Train = eval for chat-trained runs too: their prompts go through the chat template they trained with.
    render = train_prompt_renderer(target, tokenizer)
    meta = {
        "model": target.model,
        "adapter_run": str(target.run_dir.resolve()) if target.run_dir else None,
        "device": str(device),
        "dtype": str(model_obj.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "abba_cli": __version__,
    }
    results = []
    # SIGINT/SIGTERM: finish the current batch (already on disk), then stop; a second signal stops at once.
    with _EvalGracefulStop() as stop_request:
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
                    processes=processes,
                    meta=meta,
                    protocol=protocol,
                    resume=resume,
                    overwrite=overwrite,
                    stop_request=stop_request,
                    render=render,
                )
            )
    if processes.is_main:
        print(format_table(results))
        print(f"results: {target.out_dir}")
    return results
