"""`abba eval`: generate answers for benchmark tasks with a run's adapter (or a plain model) and score them.

Protocol (docs/ARCHITECTURE section 4, README "Evaluation"): prompts from `render_prompt` only (the training
prompt; `--protocol paper` adds the references' response prefix and token budget), greedy decoding with a fully
specified GenerationConfig (nothing inherited from the checkpoint), batched with left padding and an attention
mask, stop strings, the adapter merged into the base weights in memory first so generation runs at the base
model's speed. Predictions are written as they finish (`abba_cli.eval_results`); each task owns its folder
`<out>/<task>/` (`predictions.jsonl`, `metrics.json`), so evaluating one task never touches another's results.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from abba_cli import eval_results
from abba_cli.errors import UserError
from abba_cli.prompts import render_prompt
from abba_cli.scoring import score, truncate_at_stop
from abba_cli.signals import GracefulStop, TrainingStopped, signal_name

COMMONSENSE_TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")
TASK_GROUPS = {"commonsense": COMMONSENSE_TASKS}
DEFAULT_BATCH_SIZE = 8
PROTOCOLS = ("ours", "paper")
# `--limit` on a recipe with generation.limit_order "shuffled" (MATH) takes the first N of this fixed shuffle,
# so limited runs are identical across calls and a larger --limit extends a smaller one.
LIMIT_SHUFFLE_SEED = 1234


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
    train_data: Any | None = (
        None  # the run config's `data` section: a chat-trained run prompts through its template
    )


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


def _resolve_target(
    run: Path | None, model: str | None, out: Path | None, base_override: Path | None = None
) -> _Target:
    from abba_cli.runs import recorded_base, resolve_run, run_files

    if model is not None and run is None:
        # A base or merged model on its own: there is no run directory to hold the results.
        out_dir = out if out is not None else Path("eval-results") / _model_dir_name(model)
        return _Target(model, None, out_dir, {}, None)

    from abba_cli.adapters import read_adapter_config
    from abba_cli.runs import full_model_dir

    run_dir = resolve_run(run, allow_full=True)  # a run, or one of its checkpoints
    cfg = _run_config(run_files(run_dir).root)
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
        return _Target(str(trained), None, out_dir, load_kwargs, cfg.eval if cfg else None, cfg and cfg.data)
    base = read_adapter_config(run_dir)["base_model"]
    if model is None:  # the run's own base, or --base: another copy of it (UserError if it has gone)
        base = recorded_base(run_dir, base, base_override)
    load_kwargs: dict[str, Any] = {}
    if cfg is not None and (model is None or model == cfg.model.name_or_path):
        m = cfg.model
        load_kwargs = dict(
            dtype=m.dtype,
            trust_remote_code=m.trust_remote_code,
            revision=m.revision,
            attn_implementation=m.attn_implementation,
            quantization=m.quantization,  # the base as it trained: packed, adapter unmerged
            double_quant=m.double_quant,
        )
    if model is None or model == base:
        out_dir = out if out is not None else run_dir / "eval"
        return _Target(base, run_dir, out_dir, load_kwargs, cfg.eval if cfg else None, cfg and cfg.data)
    # The adapter on another base: keep those results apart from the run's own evaluation.
    out_dir = out if out is not None else run_dir / f"eval-on-{_model_dir_name(model)}"
    return _Target(model, run_dir, out_dir, load_kwargs, cfg.eval if cfg else None, cfg and cfg.data)


def load_model_for_eval(target_model: str, run_dir: Path | None, load_kwargs: dict[str, Any] | None = None):
    """(model, tokenizer, device): the base with the run's adapter merged in and unwrapped."""
    import torch

    from abba_cli.models import load_base
    from abba_cli.quant import is_quantized_model

    model, tokenizer = load_base(target_model, **(load_kwargs or {}))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bitsandbytes placed a quantized base on its device already, and W0 + dW cannot be packed back exactly.
    quantized = is_quantized_model(model)
    if device.type == "cpu" and model.dtype == torch.float16 and not quantized:
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
        if not quantized:
            merge_adapters(model)
            unwrap_adapters(model)
    if not quantized:
        model.to(device)
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only batching: prompts end where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, device


# ------------------------------------------------------------------------------------------ generation


def _eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends a response: the checkpoint's eos ids (Llama 3 has several) and the tokenizer's."""
    ids: list[int] = []
    for source in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def greedy_generation_config(model, tokenizer, max_new_tokens: int, stop: Sequence[str]):
    """Greedy decoding with every decoding knob set explicitly to its neutral value.

    transformers fills any field left None from the checkpoint's generation_config.json, so a checkpoint's
    repetition_penalty or no_repeat_ngram_size would silently survive; `generate` also swaps this config in as
    the model's own while it runs, so nothing of the checkpoint's is left to inherit (issue 13.6).
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        num_beam_groups=1,
        num_return_sequences=1,
        temperature=1.0,
        top_k=50,  # the library default: greedy ignores it (0 would draw a warning per batch)
        top_p=1.0,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        length_penalty=1.0,
        min_new_tokens=0,
        max_new_tokens=max_new_tokens,
        stop_strings=list(stop) or None,
        eos_token_id=_eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


# What metrics.json records under `generation`: every field of the config that changes which tokens come out.
GENERATION_FIELDS = (
    "do_sample",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "length_penalty",
    "min_new_tokens",
    "max_new_tokens",
    "eos_token_id",
    "pad_token_id",
    "stop_strings",
)


def generation_settings(gen_cfg) -> dict[str, Any]:
    """The effective decoding settings of a GenerationConfig, for metrics.json."""
    return {k: getattr(gen_cfg, k) for k in GENERATION_FIELDS} | {
        "bad_words_ids": gen_cfg.bad_words_ids,
        "suppress_tokens": gen_cfg.suppress_tokens,
        "forced_bos_token_id": gen_cfg.forced_bos_token_id,
        "forced_eos_token_id": gen_cfg.forced_eos_token_id,
    }


@contextlib.contextmanager
def _as_model_generation_config(model, gen_cfg) -> Iterator[None]:
    """generate() fills unset fields from `model.generation_config`: make that ours while generating."""
    saved = model.generation_config
    model.generation_config = gen_cfg
    try:
        yield
    finally:
        model.generation_config = saved


def generate_batches(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    device=None,
    desc: str = "generate",
) -> Iterator[list[tuple[int, str]]]:
    """Greedy completions, yielded one batch at a time as [(prompt index, text cut at its first stop string)].

    Prompts are sorted by token length (longest first, so memory problems show in the first batch) and batched
    with left padding and an attention mask.
    """
    import torch
    from tqdm.auto import tqdm

    if not prompts:  # e.g. --resume of a task whose every example is done
        return
    device = device or next(model.parameters()).device
    gen_cfg = greedy_generation_config(model, tokenizer, max_new_tokens, stop)
    encoded = tokenizer(list(prompts))["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    new_tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=len(prompts), desc=desc, unit="ex", file=sys.stderr, dynamic_ncols=True)
    try:
        with torch.inference_mode(), _as_model_generation_config(model, gen_cfg):
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                batch = tokenizer.pad(
                    {"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt"
                )
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model.generate(**batch, generation_config=gen_cfg, tokenizer=tokenizer)
                gen_ids = out[:, batch["input_ids"].shape[1] :]
                new_tokens += int((gen_ids != tokenizer.pad_token_id).sum())
                texts = tokenizer.batch_decode(gen_ids, skip_special_tokens=True)
                bar.update(len(idx))
                bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):.1f}")
                yield [(i, truncate_at_stop(text, stop)) for i, text in zip(idx, texts, strict=True)]
    finally:
        bar.close()


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
    """Greedy completions of `prompts`, in input order, each cut at its first stop string."""
    outputs: list[str] = [""] * len(prompts)
    for batch in generate_batches(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        stop=stop,
        device=device,
        desc=desc,
    ):
        for i, text in batch:
            outputs[i] = text
    return outputs


# ------------------------------------------------------------------------------------------ one task


def _answer_spec(recipe) -> tuple[str, list[str]]:
    answer = recipe.answer
    if answer is None:
        raise UserError(f"recipe {recipe.name!r} has no answer section; only eval recipes can be evaluated")
    return answer.type, list(answer.labels or [])


@dataclass(frozen=True)
class TaskProtocol:
    """How one task is prompted and decoded: ours (train = eval prompt) or the paper's reference scripts'."""

    name: str
    response_prefix: str
    max_new_tokens: int
    stop: list[str]


def task_protocol(recipe, protocol: str, max_new_tokens: int | None = None) -> TaskProtocol:
    """The recipe's own generation settings (`ours`) or its `generation.paper` ones; --max-new-tokens wins."""
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    gen = recipe.generation
    if protocol == "paper" and gen.paper is not None:
        p = gen.paper
        return TaskProtocol("paper", p.response_prefix, max_new_tokens or p.max_new_tokens, list(p.stop))
    # Tasks without a `paper` entry (commonsense) run as the references do already: no prefix, same budget.
    return TaskProtocol(protocol, "", max_new_tokens or gen.max_new_tokens, list(gen.stop or []))


def build_prompt(
    instruction: str, input: str | None, protocol: TaskProtocol, render: Callable = render_prompt
) -> str:
    """render_prompt (or a chat-trained run's renderer), plus the protocol's response prefix written as the
    references write it ("### Response: Let's think step by step.", on the header's line)."""
    prompt = render(instruction, input)
    if not protocol.response_prefix:
        return prompt
    if prompt.endswith("### Response:\n"):
        return prompt[:-1] + " " + protocol.response_prefix
    return prompt + protocol.response_prefix


def select_examples(recipe, skip: int = 0, limit: int | None = None):
    """(examples, SourceInfo with the count and hash of those examples).

    `limit` keeps the first N after `skip` in source order, or, for a recipe whose generation.limit_order is
    "shuffled" (MATH: subjects one after another), the first N of a fixed seeded shuffle (in source order),
    so that a limited run covers every subject and is the same on every call.
    """
    from abba_cli.recipes import load_examples

    if limit is not None and recipe.generation.limit_order == "shuffled":
        examples, source = load_examples(recipe, skip=skip, with_source=True)
        order = list(range(len(examples)))
        random.Random(LIMIT_SHUFFLE_SEED).shuffle(order)
        examples = [examples[i] for i in sorted(order[:limit])]
    else:
        examples, source = load_examples(recipe, skip=skip, limit=limit, with_source=True)
    if limit is not None and len(examples) < limit:
        print(
            f"{recipe.name}: --limit {limit} but only {len(examples)} examples after --skip {skip} "
            f"(the copy has {source.rows}); evaluating n={len(examples)}",
            file=sys.stderr,
        )
    return examples, source.with_examples(examples)


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
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int | None = None,
    device=None,
    meta: dict[str, Any] | None = None,
    protocol: str = "ours",
    resume: bool = False,
    overwrite: bool = False,
    stop_request: GracefulStop | None = None,
    render: Callable[[str, str | None], str] = render_prompt,
) -> TaskResult:
    """Generate, score and write `<out_dir>/<task>/predictions.jsonl` and `metrics.json`, appending each
    finished batch to a partial file first (see abba_cli.eval_results)."""
    from abba_cli.recipes import load_recipe

    recipe = load_recipe(task)
    answer_type, choices = _answer_spec(recipe)
    task_dir = Path(out_dir) / task
    eval_results.refuse_existing(task_dir, resume=resume, overwrite=overwrite)
    examples, source = select_examples(recipe, skip=skip, limit=limit)
    proto = task_protocol(recipe, protocol, max_new_tokens)
    gen = generation_settings(greedy_generation_config(model, tokenizer, proto.max_new_tokens, proto.stop))
    key = _resume_key(model, meta or {}, batch_size, proto, gen, source)
    done = eval_results.reusable_predictions(task_dir, key) if resume else {}
    todo = [ex for ex in examples if ex.id not in done]
    prompts = [build_prompt(ex.instruction, ex.input, proto, render) for ex in todo]

    start = time.perf_counter()
    with eval_results.PartialPredictions(task_dir, key, fresh=not resume) as partial:
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
            eval_results.say_kept(task_dir, len(examples) - len(todo) + len(new_rows), len(examples))
            raise
    seconds = time.perf_counter() - start

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
        "generated": len(todo),
        "resumed": n - len(todo),
        "seconds": round(seconds, 3),
        "examples_per_s": round(len(todo) / seconds, 4) if seconds > 0 and todo else None,
        "generation": {**gen, "batch_size": batch_size, "padding_side": "left"},
        "data_source": source.as_dict(),
        "answer_type": answer_type,
        "resume_key": key,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    eval_results.finalize(task_dir, rows, metrics)
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

    target = _resolve_target(run, model, out, base)
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
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    eval_results.check_out_dir(Path(target.out_dir))
    for task in task_list:
        eval_results.refuse_existing(Path(target.out_dir) / task, resume=resume, overwrite=overwrite)

    model_obj, tokenizer, device = load_model_for_eval(target.model, target.run_dir, target.load_kwargs)
    # Train = eval for chat-trained runs too: their prompts go through the chat template they trained with.
    render = _train_prompt_renderer(target, tokenizer)
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
                    meta=meta,
                    protocol=protocol,
                    resume=resume,
                    overwrite=overwrite,
                    stop_request=stop_request,
                    render=render,
                )
            )
    print(format_table(results))
    print(f"results: {target.out_dir}")
    return results


def _train_prompt_renderer(target: _Target, tokenizer) -> Callable[[str, str | None], str]:
    """The prompt builder the evaluated run trained with (the data engineer's hook, issue 15)."""
    from abba_cli.data import run_chat_template
    from abba_cli.prompts import prompt_renderer

    template = (
        None if target.train_data is None else run_chat_template(target.train_data, tokenizer, target.model)
    )
    return prompt_renderer(tokenizer, template)
