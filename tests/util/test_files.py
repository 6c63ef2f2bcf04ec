"""abba_cli.util.files: atomic writes survive a kill, honour the umask, give identical bytes for identical data."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from abba_cli.errors import UserError
from abba_cli.util.files import (
    atomic_directory,
    atomic_file,
    atomic_save_safetensors,
    atomic_write_text,
    check_output_dir,
)

ROOT = Path(__file__).resolve().parents[2]
META = {"format": "pt", "producer": "abba-cli-adapter", "zeta": "1", "alpha": "2", "mid": "3"}


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize(("mask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_outputs_get_the_modes_a_plain_write_gives(tmp_path, umask, mask, dir_mode, file_mode):
    umask(mask)
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_save_safetensors({"t": torch.ones(2)}, tmp_path / "t.safetensors")
    with atomic_directory(tmp_path / "d") as d:
        atomic_write_text(d / "inner.json", "{}")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "d").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "d" / "inner.json").stat().st_mode & 0o777 == file_mode


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")
    path.chmod(0o640)
    atomic_write_text(path, "new\n")
    assert path.stat().st_mode & 0o777 == 0o640 and path.read_text() == "new\n"


_SAVE = (
    f"META = {META!r}\n"
    + """
import sys, torch
from abba_cli.util.files import atomic_save_safetensors
g = torch.Generator().manual_seed(0)
tensors = {k: torch.randn(3, 4, generator=g) for k in ("b.B1", "a.A1", "c.A2")}
atomic_save_safetensors(tensors, sys.argv[1], metadata=META)
"""
)


def test_identical_tensors_give_identical_bytes_across_processes(tmp_path):
    """safetensors writes metadata in a random (Rust HashMap) order; the file must not depend on it."""
    digests = set()
    for i, seed in enumerate(["0", "1", "2", "3"]):
        out = tmp_path / f"{i}.safetensors"
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-c", _SAVE, str(out)], check=True, env=env, timeout=120)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
        assert load_file(out).keys() == {"b.B1", "a.A1", "c.A2"}
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(3, 4, generator=g) for k in ("b.B1", "a.A1", "c.A2")}
    for _ in range(4):  # and within one process, call after call
        atomic_save_safetensors(tensors, tmp_path / "here.safetensors", metadata=META)
        digests.add(hashlib.sha256((tmp_path / "here.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    from safetensors import safe_open

    with safe_open(tmp_path / "0.safetensors", "pt") as f:
        assert f.metadata() == META


def test_a_writer_failing_half_way_leaves_the_previous_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "adapter_model.safetensors"
    atomic_save_safetensors({"t": torch.zeros(4)}, path)
    before = path.read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a truncated header
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        atomic_save_safetensors({"t": torch.ones(4)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left either

    with pytest.raises(RuntimeError), atomic_file(tmp_path / "log.txt") as f:
        f.write("half")
        raise RuntimeError("killed")
    assert not (tmp_path / "log.txt").exists()


_KILLED = """
import sys, time
from pathlib import Path
from abba_cli.util.files import atomic_file
with atomic_file(sys.argv[1]) as f:
    f.write("x" * 1_000_000)
    f.flush()
    print("half", flush=True)
    time.sleep(60)
    f.write("end")
"""


def test_a_write_killed_half_way_leaves_the_previous_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("previous\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "half"  # the megabyte is on disk under some name
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert path.read_text() == "previous\n"
    partial = [p for p in tmp_path.iterdir() if p != path]
    assert len(partial) == 1 and partial[0].stat().st_size == 1_000_000  # the half write went elsewhere


def test_output_symlink_is_followed_and_a_dangling_one_refused(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert check_output_dir(link, overwrite=False) == target
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match="symlink to .*gone, which is not an existing directory"):
        check_output_dir(tmp_path / "dangling", overwrite=False)
