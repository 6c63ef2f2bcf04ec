"""`abba compare --sweep KEY=V1,V2,...`: a grid of settings, each cell a row of the table (per method).

Values are YAML, as `--set` reads them, split at the commas outside brackets, so a list is one value:
`--sweep adapter.ranks=[8,24],[16,16],[24,8]` is three cells. Several `--sweep` options give their product.
Each row keeps the parameter budget unless a swept key sets the parameter count itself (adapter.r, r1, r2, ranks,
target_modules): then the rows differ in trainable parameters on purpose, and the table prints each row's count.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from typing import Any

from abba_cli.config import parse_override_value
from abba_cli.errors import UserError

# Keys whose values set the trainable-parameter count: sweeping one frees the rows from the budget.
RANK_KEYS = ("adapter.r", "adapter.r1", "adapter.r2", "adapter.ranks", "adapter.target_modules")
# Setting one form of ABBA's ranks removes the other (the config refuses both at once).
DISPLACES = {
    "adapter.ranks": ("r1", "r2"),
    "adapter.r1": ("ranks",),
    "adapter.r2": ("ranks",),
}


@dataclass(frozen=True)
class Sweep:
    key: str
    values: tuple[Any, ...]
    texts: tuple[str, ...]  # as typed, for labels


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts]


def parse_sweep(text: str) -> Sweep:
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key or "." not in key:
        raise UserError(
            f"--sweep {text!r}: expected SECTION.KEY=V1,V2,..., e.g. --sweep adapter.alpha=4,8,16"
        )
    texts = _split_top_level(values)
    if any(not t for t in texts):
        raise UserError(f"--sweep {text!r}: an empty value; separate values with single commas")
    if len(set(texts)) != len(texts):
        raise UserError(f"--sweep {text!r}: a value is listed twice")
    return Sweep(key, tuple(parse_override_value(t) for t in texts), tuple(texts))


def parse_sweeps(texts: list[str]) -> list[Sweep]:
    sweeps = [parse_sweep(t) for t in texts]
    keys = [s.key for s in sweeps]
    if len(set(keys)) != len(keys):
        raise UserError(f"--sweep: {', '.join(k for k in keys if keys.count(k) > 1)} is swept twice")
    return sweeps


@dataclass(frozen=True)
class Cell:
    """One point of the grid: {key: value} and its labels."""

    settings: tuple[tuple[str, Any], ...]
    label: str  # "alpha=16 init=svd", for the table
    slug: str  # "alpha-16_init-svd", for run-directory names


def cells(sweeps: list[Sweep]) -> list[Cell]:
    """Every combination of the swept values (the first sweep varies slowest); one empty cell without sweeps."""
    out = []
    for combo in itertools.product(*[list(zip(s.values, s.texts, strict=True)) for s in sweeps]):
        settings = tuple((s.key, v) for s, (v, _) in zip(sweeps, combo, strict=True))
        names = [(s.key.rsplit(".", 1)[1], t) for s, (_, t) in zip(sweeps, combo, strict=True)]
        label = " ".join(f"{k}={t.replace(' ', '')}" for k, t in names)
        slug = "_".join(f"{k}-{_safe(t)}" for k, t in names)
        out.append(Cell(settings, label, slug))
    return out


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "x"


def apply_cell(raw: dict, cell: Cell) -> dict:
    """The config with the cell's settings (a displaced form of ABBA's ranks removed)."""
    raw = copy.deepcopy(raw)
    for key, value in cell.settings:
        *sections, leaf = key.split(".")
        node = raw
        for part in sections:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--sweep {key}: {part!r} is not a section")
            node = child
        for other in DISPLACES.get(key, ()):
            node.pop(other, None)
        node[leaf] = value
    return raw


def changes_rank(sweeps: list[Sweep]) -> bool:
    return any(s.key in RANK_KEYS for s in sweeps)
