"""Graceful stop for long loops: SIGINT/SIGTERM ask the loop to finish its step and save, not to die mid-write.

The training loop runs inside `GracefulStop()`; it polls `stop.requested` after each optimizer step, writes a
checkpoint, and raises `TrainingStopped`, which the CLI turns into a message and exit code 128 + signal number
(130 for Ctrl-C, 143 for SIGTERM), the shell convention for "killed by a signal". A second signal while the
checkpoint is being written stops at once (KeyboardInterrupt), for a user who really means it; the checkpoint
writes are atomic, so even that never leaves a half-written latest checkpoint.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """Training stopped on request after saving a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class GracefulStop:
    """Context manager: the first SIGINT/SIGTERM sets `signum`; the loop decides when to stop.

    Handlers can only be installed from the main thread (a Python rule); elsewhere this is inert and signals
    keep their default behaviour. The previous handlers are restored on exit.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            # Second signal: the user does not want to wait for the checkpoint.
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\nreceived {signal.Signals(signum).name}: finishing the current step and saving a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


@contextmanager
def ctrl_c_interrupts() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt (exit 130) while the run sets up, even where it was inherited as ignored.

    A shell without job control starts a background command (`abba train ... &`, scripts, some CI runners)
    with SIGINT ignored, and Python then installs no KeyboardInterrupt handler: a Ctrl-C or `kill -INT` during
    the minutes of model loading was silently lost and the run trained to the end. The loop's GracefulStop
    takes over while it runs; the previous handler is restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
