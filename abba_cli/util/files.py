"""Atomic writes: a crash or kill leaves either the old file/directory or the new one, never half of one.

Also the checks every command that writes an output directory makes first (`check_output_dir`,
`check_not_inside`). Files and directories get the permissions a plain write would give them (the umask, or
the replaced file's mode), not tempfile's owner-only 0600/0700: a serving account must be able to read a model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from abba_cli.errors import UserError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def file_mode(path: Path) -> int:
    """What `open(path, "w")` would leave: the existing file's mode, else 0o666 minus the umask."""
    with contextlib.suppress(FileNotFoundError):
        return stat.S_IMODE(path.stat().st_mode)
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode(path))
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file into a temporary sibling, then rename; the same tensors give the same bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, file_mode(path))  # save_file recreates the file: mode after it, not before
        _sort_safetensors_metadata(Path(tmp))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the header with `__metadata__` keys sorted, in place.

    safetensors writes the metadata from a Rust HashMap, whose order is random per process (and per call), so
    identical adapters got different sha256s. The tensor entries are already in a fixed order (by dtype
    alignment, then name). Reordering keeps the header's length, so only its bytes are rewritten, not the data.
    """
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        meta = header.pop("__metadata__", None)
        if not meta or len(meta) < 2:
            return
        ordered = {"__metadata__": dict(sorted(meta.items())), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # another JSON spelling than the writer's; the file stays valid as written
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))  # safetensors pads its header with spaces too


@contextlib.contextmanager
def atomic_directory(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; it appears at `final` only once complete.

    With overwrite=True an existing `final` is replaced only after the new one is fully written.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # what mkdir gives, not mkdtemp's 0700
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(out: str | Path, *, key: str = "--out", overwrite: bool | None = None) -> Path:
    """The directory a command will write into (a symlink to a directory is followed); UserError naming `key`
    when it cannot be one. Cheap, so every command runs it before any work.

    `overwrite` False refuses an existing non-empty directory (merge, export without --overwrite); None leaves
    existing content to the caller (train refuses or resumes a run, eval keeps other tasks' results).
    """
    out = Path(out).expanduser()
    if out.is_symlink():
        target = out.resolve()
        if not target.exists():
            raise UserError(
                f"{key} {out}: a dangling symlink to {target}, which is not an existing directory; "
                f"remove it or point {key} elsewhere"
            )
        if not target.is_dir():
            raise UserError(f"{key} {out}: a symlink to {target}, which is a file, not a directory")
        out = target
    if out.exists() and not out.is_dir():
        raise UserError(f"{key} {out} is a file, not a directory; choose another {key}")
    if overwrite is False and out.is_dir() and any(out.iterdir()):
        raise UserError(f"{key} {out}: directory exists and is not empty; pass --overwrite to replace it")
    # The output is created under OUT's nearest existing ancestor, which must be a writable directory; finding
    # out here, not halfway through the write, keeps the error one line and the disk untouched.
    ancestor = out.absolute()
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise UserError(f"{key} {out}: {ancestor} is a dangling symlink (to {os.readlink(ancestor)})")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{key} {out}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(
            f"{key} {out}: {ancestor} is not writable (no permission to write); choose another {key}"
        )
    return out


def check_not_inside(out: Path, protected: list[Path], runs: list[Path] = ()) -> None:
    """Replacing OUT must never delete a run or the base model: refuse OUT equal to or containing any of them,
    and OUT anywhere inside a run directory (RUN_DIR/model would make the run look like a full fine-tuning)."""
    o = Path(out).resolve()
    for p in [*protected, *runs]:
        p = Path(p).resolve()
        if o == p or o in p.parents:
            raise UserError(f"--out {out}: would replace {p}; choose another output directory")
    for p in runs:
        p = Path(p).resolve()
        if p in o.parents:
            raise UserError(f"--out {out}: is inside the run directory {p}; choose a directory outside it")
