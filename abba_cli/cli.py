"""The `abba` command line. Each command imports its module lazily so `abba --help` stays instant."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from abba_cli.errors import UserError
from abba_cli.util.signals import TrainingStopped


class _OneLineErrors(TyperGroup):
    """Usage errors the parser catches itself (a bad option value, a missing argument, an unknown command) print
    one line too, with exit code 2, like every other bad input."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except TyperException as e:
            if type(e).__name__ == "NoArgsIsHelpError" or not standalone_mode:
                if standalone_mode:
                    e.show()  # `abba` alone prints the help, as before
                    sys.exit(e.exit_code)
                raise
            ctx = getattr(e, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else ""
            print(f"error: {where}{e.format_message()} (see --help)", file=sys.stderr)
            sys.exit(e.exit_code)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


app = typer.Typer(
    cls=_OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune Hugging Face causal LMs with ABBA adapters, evaluate them, and ship a merged model.",
)

_state = {"debug": False}


def _user_errors(fn: Callable) -> Callable:
    """Bad input becomes one line on stderr and exit code 2; --debug shows the traceback instead."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if _state["debug"]:
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except TrainingStopped as e:
            # Stopped on SIGINT/SIGTERM after saving a checkpoint: say how to resume, exit 128 + signal.
            typer.echo(str(e), err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    from abba_cli.util.quiet_engines import quiet_optional_engines

    _state["debug"] = debug
    quiet_optional_engines()  # DeepSpeed/bitsandbytes say nothing in runs that do not use them


@app.command()
@_user_errors
def train(
    config: Path = typer.Argument(..., help="Run config YAML (see configs/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.lr=5e-4 (repeatable)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in output_dir from its latest checkpoint."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build everything and report, but do not train."),
) -> None:
    """Fine-tune a model with an adapter as described by CONFIG."""
    from abba_cli.config import load_config
    from abba_cli.run.layout import refuse_run_dir_as_config
    from abba_cli.train.pipeline import run_training

    refuse_run_dir_as_config(config)
    cfg = load_config(config, set_)
    run_training(cfg, config_path=config, resume=resume, dry_run=dry_run)


@app.command()
@_user_errors
def validate(
    config: Path = typer.Argument(..., help="Run config YAML."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set adapter.r1=8 (repeatable)."),
    device: str | None = typer.Option(
        None,
        "--device",
        help="Price ABBA's paths for this device type: cuda | cpu (default: the one abba train would use here).",
    ),
) -> None:
    """Print the resolved config and the trainable-parameter summary without training."""
    from abba_cli.config import load_config
    from abba_cli.run.layout import refuse_run_dir_as_config
    from abba_cli.train.execution_plan import DEVICE_TYPES
    from abba_cli.train.plan import validate_run

    refuse_run_dir_as_config(config)
    if device is not None and device not in DEVICE_TYPES:
        raise UserError(f"--device {device!r}: expected one of {', '.join(DEVICE_TYPES)}")
    cfg = load_config(config, set_)
    validate_run(cfg, config_path=config, device=device)


@app.command("eval")
@_user_errors
def eval_(
    task: list[str] = typer.Option(
        [],
        "--task",
        "-t",
        help="gsm8k, math, boolq, piqa, siqa, hellaswag, winogrande, arc_e, arc_c, obqa, "
        "commonsense (all eight); repeat or comma-separate for several.",
    ),
    run: Path | None = typer.Option(
        None, "--run", help="Run directory or RUN_DIR/checkpoints/step-N (default: the latest finished run)."
    ),
    model: str | None = typer.Option(
        None, "--model", help="Base or merged model to evaluate (path or hub id)."
    ),
    limit: int | None = typer.Option(
        None,
        "--limit",
        min=1,
        help="Evaluate N examples of each task: the first N (MATH: a fixed shuffle across all subjects).",
    ),
    skip: int | None = typer.Option(
        None,
        "--skip",
        min=0,
        help="Skip the first N examples of each task (default: the run's eval.skip, else 0).",
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        min=1,
        help="Prompts per generation batch (default: the run's eval.batch_size, else 8 on a CPU and on a GPU as "
        "many as the model's KV cache fits, up to 256).",
    ),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", min=1, help="Override per-task limit."
    ),
    out: Path | None = typer.Option(None, "--out", help="Results directory (default: RUN_DIR/eval)."),
    protocol: str = typer.Option(
        "ours",
        "--protocol",
        help="ours: the training prompt as is; paper: the ABBA reference scripts' GSM8K/MATH settings "
        '(response prefix "Let\'s think step by step.", 256 new tokens for GSM8K, 512 for MATH).',
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted (or extend a finished) eval, skipping finished ids."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace finished or interrupted results."),
    base: Path | None = typer.Option(
        None,
        "--base",
        help="Another copy of the run's base model (default: the one adapter_config.json names).",
    ),
) -> None:
    """Evaluate a run (or a plain model) on benchmark tasks."""
    from abba_cli.eval.evaluate import run_eval

    tasks = [t.strip() for item in task for t in item.split(",") if t.strip()]
    run_eval(
        tasks=tasks,
        run=run,
        model=model,
        limit=limit,
        skip=skip,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        out=out,
        protocol=protocol,
        resume=resume,
        overwrite=overwrite,
        base=base,
    )


@app.command()
@_user_errors
def merge(
    out: Path = typer.Option(..., "--out", help="Directory for the merged Hugging Face model."),
    run: Path | None = typer.Option(
        None, "--run", help="Run directory or RUN_DIR/checkpoints/step-N (default: the latest finished run)."
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (default: the base's dtype)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
    base: Path | None = typer.Option(
        None,
        "--base",
        help="Another copy of the run's base model (default: the one adapter_config.json names).",
    ),
    onto: str = typer.Option(
        "original",
        "--onto",
        help="A quantized-base run: fold into the original unquantized base, or into the dequantized weights "
        "it trained against (dequantized: the merged model computes what trained).",
    ),
) -> None:
    """Fold the adapter into the base weights and write a plain Hugging Face model."""
    from abba_cli.ship.merge import merge_run

    merge_run(out=out, run=run, dtype=dtype, overwrite=overwrite, base=base, onto=onto)


@app.command()
@_user_errors
def export(
    format: str = typer.Option("peft-lora", "--format", help="Export format: peft-lora, peft-loha or gguf."),
    out: Path = typer.Option(
        ..., "--out", help="Directory for the exported adapter (gguf: the file, e.g. model.gguf)."
    ),
    run: Path | None = typer.Option(
        None, "--run", help="Run directory or RUN_DIR/checkpoints/step-N (default: the latest finished run)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
    base: Path | None = typer.Option(
        None,
        "--base",
        help="Another copy of the run's base model (default: the one adapter_config.json names).",
    ),
    rank: int | None = typer.Option(
        None, "--rank", min=1, help="peft-lora: truncate each layer to its best rank-K approximation (SVD)."
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", help="gguf: f16 (default), bf16 or q8_0 (the merged model's weights in the file)."
    ),
    onto: str | None = typer.Option(
        None,
        "--onto",
        help="gguf of a quantized-base run: merge onto the original (default) or dequantized base.",
    ),
) -> None:
    """Export the adapter for other tools (ABBA is exactly a LoRA of rank r1*r2, and a PEFT LoHa), or the merged
    model as GGUF for llama.cpp and Ollama."""
    from abba_cli.ship.export import export_run

    export_run(
        format=format, out=out, run=run, overwrite=overwrite, base=base, rank=rank, dtype=dtype, onto=onto
    )


@app.command()
@_user_errors
def inspect(
    runs: list[Path] = typer.Argument(
        ..., help="Run directories (ABBA, LoRA, HiRA, full fine-tuning), or an `abba compare` --out folder."
    ),
    out: Path = typer.Option(..., "--out", help="Directory for inspect.json and inspect.png."),
    base: Path | None = typer.Option(
        None, "--base", help="Another copy of the base model (default: the one each run recorded)."
    ),
) -> None:
    """Singular values of each layer's dW: effective rank, 90%-energy rank, ||dW||/||W0||."""
    from abba_cli.analysis.spectra_report import run_inspect

    run_inspect(runs, out, base)


@app.command()
@_user_errors
def compare(
    config: Path = typer.Argument(..., help="Run config YAML; its adapter block sets the parameter budget."),
    methods: str = typer.Option(
        "abba,lora,hira",
        "--methods",
        help="Comma-separated: abba, lora, hira, rslora, pissa, dora, lora_pro, full.",
    ),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds 1..N per method (train.seed = data.seed)."),
    out: Path = typer.Option(..., "--out", help="Folder for every run, the table and the curves."),
    set_: list[str] = typer.Option(
        [], "--set", help="KEY=VALUE for every method, METHOD:KEY=VALUE for one (--set lora:train.lr=3e-4)."
    ),
    sweep: list[str] = typer.Option(
        [],
        "--sweep",
        help="KEY=V1,V2,... : one row per value (repeat: the grid); e.g. --sweep adapter.alpha=4,8,16 or "
        "--sweep adapter.ranks=[8,24],[16,16]. At the budget unless the key is a rank.",
    ),
    paper: str | None = typer.Option(
        None, "--paper", help="Print this table of the paper's figures beside ours (e.g. table1-llama3.2-1b)."
    ),
) -> None:
    """Train and evaluate several methods at equal trainable parameters; resumable (rerun the same command)."""
    from abba_cli.analysis.compare import run_compare

    run_compare(config, methods, seeds, out, set_, sweep, paper)


@app.command()
@_user_errors
def chat(
    run: Path | None = typer.Option(
        None, "--run", help="Run directory, RUN_DIR/best or a checkpoint (default: the latest finished run)."
    ),
    model: str | None = typer.Option(
        None, "--model", help="A plain or merged model folder instead of a run."
    ),
    base: Path | None = typer.Option(
        None,
        "--base",
        help="Another copy of the run's base model (default: the one adapter_config.json names).",
    ),
    prompt: str | None = typer.Option(
        None, "--prompt", help="Answer this one message, print only the answer, and exit (scriptable)."
    ),
    max_new_tokens: int | None = typer.Option(
        None,
        "--max-new-tokens",
        min=1,
        help="Tokens per answer (default: the run's eval.max_new_tokens, else 256).",
    ),
    temperature: float = typer.Option(
        0.0, "--temperature", help="0: greedy decoding (default, as abba eval); above 0: sampling."
    ),
    top_p: float | None = typer.Option(None, "--top-p", help="Sampling: nucleus probability mass (0, 1]."),
    top_k: int | None = typer.Option(None, "--top-k", help="Sampling: keep the K most likely tokens."),
    seed: int | None = typer.Option(None, "--seed", help="Sampling: seed for reproducible answers."),
    prompt_format: str = typer.Option(
        "auto",
        "--prompt-format",
        help="auto: the run's own (its chat template if it trained on chat data, else the training prompt; a "
        "plain --model: its chat template if it has one); chat; alpaca.",
    ),
) -> None:
    """Talk to a trained model in the terminal, in the prompt format it trained with."""
    from abba_cli.chat.generation import Sampling
    from abba_cli.chat.session import run_chat

    run_chat(
        run=run,
        model=model,
        base=base,
        prompt=prompt,
        prompt_format=prompt_format,
        sampling=Sampling(temperature, top_p, top_k, seed),
        max_new_tokens=max_new_tokens,
    )
