"""Reading a YAML (or JSON) file the user wrote: UTF-8 only, every syntax error and repeated key one line
naming the file, line and column. Run configs (config/files.py) and recipes (data/recipes.py) both come through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from abba_cli.errors import UserError


def read_utf8(path: Path) -> str:
    """A text file's content; bytes that are not UTF-8 are a UserError naming the line, not a traceback."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}: line {line}: byte 0x{data[e.start]:02x} is not UTF-8; save the file as UTF-8"
        ) from None


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then overriding a key is YAML's way to extend a mapping
            key = self.construct_object(key_node, deep=True)
            try:
                if key in first_line:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, first_line[key])
                first_line[key] = key_node.start_mark.line + 1
            except TypeError:
                pass  # an unhashable key: SafeLoader's own construct_mapping reports it
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file as Python data; non-UTF-8 bytes, syntax errors and duplicate keys are one-line UserErrors."""
    text = read_utf8(path)
    try:
        # What yaml.load does, spelled out so that no yaml.load call exists in the package (test_security):
        # a SafeLoader subclass builds no arbitrary objects.
        loader = _UniqueKeyLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except _DuplicateKey as e:
        raise UserError(
            f"{path}: line {e.line}: key {e.key!r} is given twice (first on line {e.first}); keep one"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"{path}: YAML syntax error{where}: {getattr(e, 'problem', None) or e}") from None
