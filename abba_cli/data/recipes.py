"""Dataset and task recipes: where rows come from and how a raw row becomes an `Example`.

A recipe is a YAML file in `abba_cli/recipes/` (see docs/DEVELOPING.md, "The recipe contract"). Everything
dataset-specific lives in the YAML: the sources, `derive` (named values computed from a row's fields by a
short chain of generic ops), and `render` (Python `str.format` templates over the row plus the derived
values). This module holds only the generic machinery, so adding a task means adding a YAML file.

Modules: `abba_cli.data.recipe_schema` (the pydantic schema), `abba_cli.data.sources` (reading rows: local, hub,
bundled), `abba_cli.data.derive` (the derive ops); this one finds recipes and turns rows into `Example`s.
"""

from __future__ import annotations

import random
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from abba_cli.data.derive import DeriveMissing, derive_value, last_boxed
from abba_cli.data.formats import ChatExample, TextExample, TokenizedExample, parse_row
from abba_cli.data.recipe_schema import (
    Answer,
    BundledSource,
    Derive,
    Generation,
    HubSource,
    Mix,
    Recipe,
    Render,
    Sources,
)
from abba_cli.data.sources import LOCAL_SUFFIXES, read_rows
from abba_cli.errors import UserError

__all__ = [
    "LOCAL_SUFFIXES",
    "RECIPES_DIR",
    "Answer",
    "BundledSource",
    "ChatExample",
    "Derive",
    "Example",
    "Generation",
    "HubSource",
    "Mix",
    "Recipe",
    "Render",
    "Sources",
    "TextExample",
    "TokenizedExample",
    "available_recipes",
    "last_boxed",
    "load_examples",
    "load_recipe",
    "load_split",
    "parse_recipe",
]

# The recipe YAML ships as package data in abba_cli/recipes/ (a top-level recipes/ symlink shows it to users).
RECIPES_DIR = Path(__file__).parent.parent / "recipes"


@dataclass(frozen=True)
class Example:
    """One rendered example. `output` is the training target; `gold` the answer evaluation compares to."""

    id: str
    instruction: str
    input: str | None
    output: str | None
    gold: str | None


# ----------------------------------------------------------------------------------------------------------
# Finding recipes
# ----------------------------------------------------------------------------------------------------------


def _recipe_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def available_recipes(kind: str | None = None) -> list[str]:
    """Names of the shipped recipes, optionally only those of one kind (train | eval)."""
    names = sorted(_recipe_files())
    if kind is None:
        return names
    return [n for n in names if load_recipe(n).kind == kind]


def parse_recipe(raw: Any, source: str) -> Recipe:
    """Validate a recipe mapping; every problem at once, as a UserError naming the file and key."""
    from abba_cli.config import format_validation_error

    if not isinstance(raw, dict):
        raise UserError(f"{source}: a recipe is a mapping (name, description, kind, source, render, ...)")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(source, e)) from None


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name, or a recipe YAML by path."""
    files = _recipe_files()
    path = files.get(name_or_path)
    if path is None:
        candidate = Path(name_or_path)
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            path = candidate
        elif candidate.suffix in (".yaml", ".yml"):
            raise UserError(f"recipe file {name_or_path}: not found")
        else:
            raise UserError(
                f"unknown recipe {name_or_path!r}; valid: {', '.join(sorted(files))} (or a path to a .yaml)"
            )
    from abba_cli.util.yaml_file import (
        read_yaml,  # one line for non-UTF-8 bytes, syntax errors and duplicate keys
    )

    recipe = parse_recipe(read_yaml(path), str(path))
    if path.parent == RECIPES_DIR and recipe.name != path.stem:
        raise UserError(f"{path}: name {recipe.name!r} must match the file name {path.stem!r}")
    return recipe


# ----------------------------------------------------------------------------------------------------------
# Rendering rows
# ----------------------------------------------------------------------------------------------------------


def _render_row(recipe: Recipe, derive: dict[str, Derive], row: dict, index: int, where: str) -> Example:
    at = f"recipe {recipe.name}, row {index} of {where}"
    values = dict(row)
    for key, spec in derive.items():
        try:
            values[key] = derive_value(spec, values)
        except DeriveMissing as e:
            raise UserError(f"{at}: cannot derive {key!r}: {e}") from None
        except ValueError as e:
            raise UserError(f"{at}: {key}: {e}") from None
    r = recipe.render

    def fmt(template: str | None, part: str, required: bool) -> str | None:
        """The rendered part; a null field makes an optional part absent and a required one an error
        (str.format would otherwise render it as the text "None")."""
        if template is None:
            return None
        nulls = [f for f in _template_fields(template) if f in values and values[f] is None]
        if nulls:
            if required:
                raise UserError(
                    f"{at}: field {nulls[0]!r} is null (it fills render.{part}); fix or drop the row"
                )
            return None
        text = template.format_map(values)
        if required and part == "output" and not text.strip():
            raise UserError(f"{at}: render.output is empty: nothing to train on; fix or drop the row")
        return text

    train, evaluation = recipe.kind == "train", recipe.kind == "eval"
    return Example(
        id=(r.id and fmt(r.id, "id", False)) or f"{recipe.name}-{index}",
        instruction=fmt(r.instruction, "instruction", True),
        input=fmt(r.input, "input", False) or None,
        output=fmt(r.output, "output", train),
        gold=None if r.gold is None else str(fmt(r.gold, "gold", evaluation)),
    )


def _template_fields(template: str) -> list[str]:
    """Top-level names a str.format template reads ("{choices[0]}" and "{a.b}" read choices and a)."""
    return [f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(template) if f]


def _missing_field_error(recipe: Recipe, where: str, field: str, row: dict) -> UserError:
    present = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
    return UserError(
        f"recipe {recipe.name}: field {field!r} not found in the rows of {where}; fields present: {present}"
        " (map them with data.path pointing at data in the recipe's schema, or write a recipe for it)"
    )


def _select(
    n: int, skip: int, limit: int | None, num_samples: int | None, seed: int, name: str, held_out: int = 0
) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices), both in source order; see `load_split`."""
    if skip >= n:
        raise UserError(f"recipe {name}: skip {skip} leaves no examples (the source has {n})")
    indices = list(range(skip, n))
    if limit is not None:
        indices = indices[:limit]
    held: list[int] = []
    if held_out:
        if held_out >= len(indices):
            raise UserError(
                f"recipe {name}: val_samples {held_out} leaves no training examples "
                f"(the source has {len(indices)} after skipping {skip})"
            )
        # A generator of its own (a string seed hashes deterministically): the held-out set depends only on
        # the source, skip and seed, never on how many training examples are drawn after it.
        held = sorted(random.Random(f"held-out:{seed}").sample(indices, held_out))
        taken = set(held)
        indices = [i for i in indices if i not in taken]
    if num_samples is not None:
        if num_samples >= len(indices):
            if num_samples > len(indices):
                print(
                    f"recipe {name}: num_samples {num_samples} > the {len(indices)} available; using all",
                    file=sys.stderr,
                )
        else:
            indices = sorted(random.Random(seed).sample(indices, num_samples))
    return indices, held


def load_examples(
    recipe: Recipe | str,
    path: str | None = None,
    num_samples: int | None = None,
    skip: int = 0,
    seed: int = 42,
    *,
    limit: int | None = None,
    source: Literal["auto", "hub", "bundled"] = "auto",
    with_source: bool = False,
) -> list[Example] | list[ChatExample] | list[TextExample] | list[TokenizedExample]:
    """Examples of a recipe: skip the first `skip` rows (source order), keep the first `limit` of the rest,
    then take a seeded random subset of `num_samples` (returned in source order).

    `source` forces a copy ('hub' or 'bundled'); 'auto' tries the hub then the bundled copy. `path` (a local
    json/jsonl/parquet file or directory) overrides both. `with_source=True` returns (examples, SourceInfo).
    """
    split = load_split(
        recipe, path, num_samples, skip, seed, limit=limit, source=source, with_source=with_source
    )
    return (split[0], split[2]) if with_source else split[0]


def load_split(
    recipe: Recipe | str,
    path: str | None = None,
    num_samples: int | None = None,
    skip: int = 0,
    seed: int = 42,
    *,
    held_out: int = 0,
    limit: int | None = None,
    source: Literal["auto", "hub", "bundled"] = "auto",
    with_source: bool = False,
) -> tuple[list[Example], list[Example]]:
    """(examples, held-out examples) of a recipe, disjoint by construction.

    As `load_examples`, except that `held_out` examples are first drawn (seeded by `seed`, with a generator of
    their own) from the rows left after skip/limit and set aside; the `num_samples` subset is then drawn from
    the remaining rows. The held-out set is therefore the same whatever `num_samples` is.
    """
    if isinstance(recipe, str):
        recipe = load_recipe(recipe)
    if recipe.mix is not None:
        if with_source:
            raise ValueError(f"recipe {recipe.name} is a mix of several copies; with_source needs one")
        return _load_mix(recipe, path, num_samples, skip, seed, limit, held_out)
    rows, derive, where = read_rows(recipe, path, source)
    n = len(rows)
    if n == 0:
        raise UserError(f"recipe {recipe.name}: {where} has no rows")
    indices, held = _select(n, skip, limit, num_samples, seed, recipe.name, held_out)
    wanted = sorted(indices + held)
    if hasattr(rows, "select"):  # a datasets.Dataset: materialise only the rows we keep
        picked = rows.select(wanted).to_list()
    else:
        picked = [rows[i] for i in wanted]
    rendered: dict[int, Any] = {}
    for i, row in zip(wanted, picked, strict=True):
        if recipe.format != "instruction":  # chat / text / tokenized rows: checked, not rendered
            rendered[i] = parse_row(recipe.format, row, i, recipe.name, where)
            continue
        try:
            rendered[i] = _render_row(recipe, derive, row, i, where)
        except KeyError as e:
            raise _missing_field_error(recipe, where, e.args[0], row) from None
        except (IndexError, AttributeError, TypeError, ValueError) as e:
            raise UserError(f"recipe {recipe.name}, row {i} of {where}: cannot render: {e}") from None
    examples, held_examples = [rendered[i] for i in indices], [rendered[i] for i in held]
    if with_source:  # eval records which copy ran as metrics.json data_source (abba_cli.data.provenance)
        from abba_cli.data.provenance import describe_source

        return examples, held_examples, describe_source(recipe, path, where, n)
    return examples, held_examples


def _load_mix(
    recipe: Recipe,
    path: str | None,
    num_samples: int | None,
    skip: int,
    seed: int,
    limit: int | None,
    held_out: int = 0,
) -> tuple[list[Example], list[Example]]:
    if path is not None:
        raise UserError(
            f"recipe {recipe.name} mixes {', '.join(recipe.mix.recipes)}; data.path cannot override a mix"
        )
    examples: list[Example] = []
    for name in recipe.mix.recipes:
        part = load_recipe(name)
        if part.mix is not None or part.render.output is None:
            raise UserError(
                f"recipe {recipe.name}: component {name} must be a plain recipe with render.output"
            )
        examples.extend(load_examples(part, skip=recipe.mix.skip_per_recipe, source=recipe.mix.source))
    indices, held = _select(len(examples), skip, limit, num_samples, seed, recipe.name, held_out)
    return [examples[i] for i in indices], [examples[i] for i in held]
