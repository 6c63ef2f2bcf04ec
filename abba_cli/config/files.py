"""A run config file becomes a RunConfig: read (UTF-8, no repeated keys), `--set` overrides applied, validated
with every problem reported at once as one UserError naming the file and the dotted key, and written back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from abba_cli.config.sections import RunConfig
from abba_cli.errors import UserError
from abba_cli.util.yaml_file import read_yaml


def parse_override_value(text: str) -> Any:
    """`--set` values are YAML scalars/lists, so `1e-3`, `true`, `[q_proj,v_proj]` and `null` all work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides to a raw config mapping (before validation)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=5e-4")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = parse_override_value(value)
    return raw


def _valid_keys_hint(model: type[BaseModel] | None, loc: tuple) -> str:
    """' (valid keys: ...)' for an unknown key, so the user sees the fix, not only the mistake."""
    if model is None:
        return ""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return ""
        model = ann
    return f" (valid keys: {', '.join(model.model_fields)})"


def format_validation_error(source: str, err: ValidationError, model: type[BaseModel] | None = None) -> str:
    """All problems on one line: `file: key.path: message; key2: message` (`model` lists valid keys)."""
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + _valid_keys_hint(model, e["loc"])
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "finite_number":
            msg = f"must be a finite number (got {e['input']!r})"
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        problems.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(problems)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; any problem is a UserError naming file and key."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a config file; pass a run config YAML (see configs/)")
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(
            f"{path}: expected a mapping of sections (model, adapter, data, train, distributed, eval, output_dir)"
        )
    raw = apply_overrides(raw, overrides or [])
    return validate_config(raw, str(path))


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(source, e, RunConfig)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
