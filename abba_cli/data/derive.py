"""The `derive` mini-language: a named value read from a raw row (or formatted) and passed through ops.

The ops and their arguments are validated by `abba_cli.data.recipe_schema.Derive`; this module applies them.
"""

from __future__ import annotations

import re
from typing import Any

from abba_cli.data.latex import last_boxed  # one implementation for golds (here) and answers (scoring)
from abba_cli.data.recipe_schema import Derive


class DeriveMissing(Exception):
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
            raise DeriveMissing("no \\boxed{}")
        return boxed
    name, arg = next(iter(op.items()))
    if name == "sub":
        return re.sub(arg[0], arg[1], str(value))
    if name == "search":
        m = re.search(arg, str(value))
        if m is None:
            raise DeriveMissing(f"no match for {arg!r}")
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


def derive_value(spec: Derive, row: dict) -> Any:
    try:
        if spec.field is not None:
            try:
                value = _get_path(row, spec.field)
            except KeyError:
                if spec.fallback is None:
                    raise
                raise DeriveMissing(f"no field {spec.field}") from None
            if value is None or value == "":
                raise DeriveMissing(f"empty field {spec.field}")
        else:
            value = spec.template.format_map(row)
        for op in spec.ops:
            value = _apply_op(op, value)
        return value
    except DeriveMissing:
        if spec.fallback is None:
            raise
        return derive_value(spec.fallback, row)
