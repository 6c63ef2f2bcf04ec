"""A run's training and validation sets, from `data:` config to tokenized datasets (through the cache), and the
chat template a run trains (and so evaluates) with.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

from abba_cli.config import DataConfig
from abba_cli.data.cache import cache_dir, cache_key, read_or_build
from abba_cli.data.prompts import resolve_chat_template
from abba_cli.data.recipes import Recipe, load_examples, load_recipe, load_split
from abba_cli.data.tokenize import build_train_dataset, chat_tokens
from abba_cli.errors import UserError


def load_train_examples(d: DataConfig) -> tuple[Recipe, list, list]:
    """(recipe, training examples, validation examples) for data config `d`, every row checked (no tokenizer,
    no model). Validation: data.val_samples held out of the source (recipes.load_split), or data.val_path."""
    recipe = load_recipe(d.recipe)
    if d.chat_template is not None and recipe.format != "chat":
        raise UserError(f"data.chat_template applies to data.recipe chat, not to {d.recipe!r}")
    examples, held_out = load_split(
        recipe, d.path, d.num_samples, d.skip_samples, d.seed, held_out=d.val_samples or 0
    )
    if d.val_path is not None:
        held_out = load_examples(recipe, path=d.val_path)
    return recipe, examples, held_out


def run_chat_template(d: DataConfig, tokenizer, model_name: str = "the model") -> str | None:
    """The chat template a run trained with (None: it trained on the Alpaca prompt); evaluation renders
    through the same one (`prompts.prompt_renderer`)."""
    if load_recipe(d.recipe).format != "chat":
        return None
    return resolve_chat_template(tokenizer, d.chat_template, model_name)


def check_examples(d: DataConfig, examples: Sequence, tokenizer, model_name: str) -> str:
    """`abba validate`'s data line: the rows were checked on loading; a chat run's template is resolved and
    tried on the first conversation. Full tokenisation (and the max_seq_len checks) stays with training."""
    template = run_chat_template(d, tokenizer, model_name)
    if template is not None:
        ids, mask = chat_tokens(tokenizer, examples[0].messages, template, examples[0].id)
        if not any(mask):
            raise UserError(
                f"example {examples[0].id}: the chat template left no assistant token to train on"
            )
    kind = "conversations" if template is not None else "examples"
    return f"# data: {len(examples)} {kind} from data.recipe {d.recipe}" + (f" ({d.path})" if d.path else "")


def run_dir_chat_template(run_dir: Path, tokenizer, model_name: str = "the model") -> str | None:
    """The chat template of a run directory's training (None: Alpaca prompts, or no readable config.yaml)."""
    from abba_cli.run.layout import read_run_config

    try:
        cfg = read_run_config(run_dir)
    except UserError:
        return None
    return None if cfg is None else run_chat_template(cfg.data, tokenizer, model_name)


def prepare_train_dataset(d: DataConfig, tokenizer, model_name: str, main_process_first=None):
    """(training set, validation set or None), tokenized: from the on-disk cache when built before.

    `main_process_first` (accelerate's context manager) lets the main process build and save the cache while
    the others wait, then read it.
    """
    recipe, examples, held_out = load_train_examples(d)
    template = (
        resolve_chat_template(tokenizer, d.chat_template, model_name) if recipe.format == "chat" else None
    )
    if d.chat_template is not None:
        # The run's tokenizer carries the template it trained with (a full fine-tune saves this tokenizer).
        tokenizer.chat_template = template

    def build(part: list):
        return lambda: build_train_dataset(
            part, tokenizer, d.max_seq_len, d.train_on_inputs, d.drop_long, template
        )

    datasets = []
    for part in (examples, held_out):
        if not part:
            datasets.append(None)
        elif not d.cache:
            datasets.append(build(part)())
        else:
            path = cache_dir() / cache_key(part, tokenizer, template, d)
            with main_process_first() if main_process_first is not None else nullcontext():
                datasets.append(read_or_build(path, build(part)))
    if datasets[0] is None:
        raise UserError(
            f"data.recipe {d.recipe!r}: no training examples (check data.num_samples/skip_samples)"
        )
    return datasets[0], datasets[1]
