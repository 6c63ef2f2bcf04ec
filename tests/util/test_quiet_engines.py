"""Installed optional engines (DeepSpeed, bitsandbytes) say nothing in runs that use neither: a fresh `abba train`
and `abba merge` process each (imports are cached per process, so only a new one shows what a user sees)."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env, tiny_config

from abba_cli.util.quiet_engines import quiet_optional_engines

REPO = Path(__file__).resolve().parents[2]
ENGINE_NOTES = ("Setting accelerator to CPU", "kernels-community", "bitsandbytes", "DeepSpeed")


def _abba(tmp_path: Path, *args: str) -> str:
    env = subprocess_env(tmp_path, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "abba_cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@pytest.mark.slow  # two subprocesses
@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("bitsandbytes") is None,
    reason="needs DeepSpeed and bitsandbytes installed (make install) to show they stay quiet",
)
def test_plain_train_and_merge_print_nothing_about_optional_engines(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, train={"max_steps": 1})
    train_output = _abba(tmp_path, "train", str(config))
    merge_output = _abba(tmp_path, "merge", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))
    for command, output in (("train", train_output), ("merge", merge_output)):
        said = [line for line in output.splitlines() if any(note in line for note in ENGINE_NOTES)]
        assert not said, (command, said)


@pytest.mark.parametrize(
    ("logger_name", "note"),
    [
        (
            "DeepSpeed",
            "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
        ),
        (
            "bitsandbytes.backends.cpu.ops",
            "Failed to load CPU gemm_4bit_forward from kernels-community: Kernel repository "
            "'kernels-community/quantization-bitsandbytes' could not verify publisher trust status.",
        ),
    ],
)
def test_only_the_startup_note_is_dropped(logger_name, note):
    quiet_optional_engines()
    quiet_optional_engines()  # idempotent: one filter
    logger = logging.getLogger(logger_name)
    assert len(logger.filters) == 1

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.seen.append(record.getMessage())

    handler = Collect()
    logger.addHandler(handler)
    try:
        logger.warning(note)
        logger.warning("zero3: partitioning parameters")
    finally:
        logger.removeHandler(handler)
    assert handler.seen == ["zero3: partitioning parameters"]
