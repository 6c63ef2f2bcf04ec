"""The tokenized-data cache: `$ABBA_HOME/cache/datasets/<key>/`, keyed by everything the tokenized dataset
depends on, so the next run (and --resume) skips tokenisation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from abba_cli.config import DataConfig
from abba_cli.run.layout import abba_home
from abba_cli.util.files import atomic_directory

# Bump when the tokenized layout changes, so old cache entries are never read as new ones.
CACHE_VERSION = 1


def cache_dir() -> Path:
    return abba_home() / "cache" / "datasets"


def cache_key(examples: Sequence, tokenizer, template: str | None, d: DataConfig) -> str:
    """Hash of everything the tokenized dataset depends on: the examples' content (source rows, recipe
    rendering, sample selection), the tokenizer (its full serialisation), the chat template and the settings."""
    h = hashlib.sha256(f"abba-data-v{CACHE_VERSION}".encode())
    for e in examples:
        h.update(json.dumps([type(e).__name__, dataclasses.asdict(e)], sort_keys=True).encode())
        h.update(b"\n")
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    settings = [template, d.max_seq_len, d.train_on_inputs, d.drop_long]
    h.update(json.dumps(settings).encode())
    return h.hexdigest()[:32]


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        [type(tokenizer).__name__, tokenizer.special_tokens_map, tokenizer.eos_token_id], default=str
    )
    return hashlib.sha256((body + extra).encode()).hexdigest()


def read_or_build(path: Path, build):
    from datasets import load_from_disk

    if path.is_dir():
        try:
            ds = load_from_disk(str(path))
            print(f"tokenized data: reusing the cache {path} ({len(ds)} examples)", file=sys.stderr)
            return ds
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is rebuilt, never fatal
            print(
                f"tokenized data: cache {path} unreadable ({type(e).__name__}); rebuilding", file=sys.stderr
            )
    ds = build()
    try:
        if not path.is_dir():
            with atomic_directory(path, overwrite=True) as tmp:
                ds.save_to_disk(str(tmp))
        print(f"tokenized data: cached in {path} (--set data.cache=false to skip)", file=sys.stderr)
        return load_from_disk(str(path))
    except OSError as e:
        print(
            f"warning: cannot write the data cache {path} ({e.strerror or e}); continuing without",
            file=sys.stderr,
        )
        return ds
