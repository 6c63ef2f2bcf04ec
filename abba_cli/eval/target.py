"""Which model a `--run`/`--model` means for evaluation, where its results go, and loading it: the base with the
run's adapter merged in and unwrapped, so generation runs at the base model's speed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abba_cli.errors import UserError
from abba_cli.eval.results import run_eval_dir


@dataclass
class EvalTarget:
    """What is being evaluated and where its results go."""

    model: str  # base or merged model, as given to load_base
    run_dir: Path | None  # adapter run, or None for a plain model
    out_dir: Path
    load_kwargs: dict[str, Any]
    eval_defaults: Any | None  # the run config's `eval` section, when the run has one
    train_data: Any | None = (
        None  # the run config's `data` section: a chat-trained run prompts through its template
    )


def model_dir_name(model: str) -> str:
    """A folder name for a model path or hub id: its last component."""
    return Path(model.rstrip("/")).name or "model"


def resolve_target(
    run: Path | None, model: str | None, out: Path | None, base_override: Path | None = None
) -> EvalTarget:
    """What `--run`/`--model` (and `--base`, `--out`) mean; UserError before anything loads."""
    from abba_cli.adapters import read_adapter_config
    from abba_cli.models.loading import load_kwargs
    from abba_cli.run.latest import recorded_base, resolve_run
    from abba_cli.run.layout import full_model_dir, read_run_config, run_files

    if model is not None and run is None:
        # A base or merged model on its own: there is no run directory to hold the results.
        out_dir = out if out is not None else Path("eval-results") / model_dir_name(model)
        return EvalTarget(model, None, out_dir, {}, None)

    run_dir = resolve_run(run, allow_full=True)  # a run, or one of its checkpoints
    cfg = read_run_config(run_files(run_dir).root)
    eval_defaults, train_data = (cfg.eval, cfg.data) if cfg is not None else (None, None)
    trained = full_model_dir(run_dir)
    if trained is not None:
        # Full fine-tuning: the run holds the trained model itself; there is no adapter to put on another base.
        if model is not None:
            raise UserError(
                f"--run {run_dir} is a full fine-tuning run (its model is {trained}); pass --run or --model, not both"
            )
        kwargs = load_kwargs(cfg.model) if cfg is not None else {}
        out_dir = out if out is not None else run_eval_dir(run_dir)
        return EvalTarget(str(trained), None, out_dir, kwargs, eval_defaults, train_data)
    base = read_adapter_config(run_dir)["base_model"]
    if model is None:  # the run's own base, or --base: another copy of it (UserError if it has gone)
        base = recorded_base(run_dir, base, base_override)
    same_base = cfg is not None and (model is None or model == cfg.model.name_or_path)
    kwargs = load_kwargs(cfg.model) if same_base else {}
    if model is None or model == base:
        out_dir = out if out is not None else run_eval_dir(run_dir)
        return EvalTarget(base, run_dir, out_dir, kwargs, eval_defaults, train_data)
    # The adapter on another base: keep those results apart from the run's own evaluation.
    out_dir = out if out is not None else run_dir / f"eval-on-{model_dir_name(model)}"
    return EvalTarget(model, run_dir, out_dir, kwargs, eval_defaults, train_data)


def load_model_for_eval(
    target_model: str, run_dir: Path | None, load_kwargs: dict[str, Any] | None = None, device=None
):
    """(model, tokenizer, device): the base with the run's adapter merged in (on `device`, by default this
    process's GPU if there is one) and unwrapped."""
    import torch

    from abba_cli.adapters.fold import fold_device
    from abba_cli.models.loading import load_base
    from abba_cli.models.quantization import is_quantized_model

    model, tokenizer = load_base(target_model, **(load_kwargs or {}))
    device = device or fold_device()
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
        # On the device the model runs on: a GPU folds a 7B model in seconds.
        if not quantized:
            model.to(device)
            merge_adapters(model)
            unwrap_adapters(model)
    if not quantized:
        model.to(device)
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only batching: prompts end where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, device


def train_prompt_renderer(target: EvalTarget, tokenizer) -> Callable[[str, str | None], str]:
    """The prompt builder the evaluated run trained with."""
    from abba_cli.data.prompts import prompt_renderer
    from abba_cli.data.training_set import run_chat_template

    template = (
        None if target.train_data is None else run_chat_template(target.train_data, tokenizer, target.model)
    )
    return prompt_renderer(tokenizer, template)
