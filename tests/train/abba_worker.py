"""`abba ARGS...` as a subprocess (alone or as one process of a torchrun launch), with two test hooks that
act from inside the process, at a known point, through real signals:

- ABBA_TEST_SIGTERM_AT=N: the process of rank 1 sends itself SIGTERM during its N-th micro-batch (inside the
  loss, through the run's `loss_fn` seam), so a stop lands at a known step on one process only: every process
  must still agree to stop after that step, checkpoint and exit (tests/train/test_distributed_strategies.py).
- ABBA_TEST_SIGINT_IN_LOAD=1: the process sends itself SIGINT as the base model starts loading
  (tests/cli/test_hostile_train.py).
"""

from __future__ import annotations

import os
import signal

from abba_cli.models import loading as models
from abba_cli.train.context import Run

_AT = int(os.environ.get("ABBA_TEST_SIGTERM_AT", "0"))

if _AT and os.environ.get("RANK") == "1":
    _loss_fn, _calls = Run.loss_fn, [0]

    def _loss_then_sigterm(self, logits, labels):
        _calls[0] += 1
        if _calls[0] == _AT:
            os.kill(os.getpid(), signal.SIGTERM)
        return _loss_fn(self, logits, labels)

    Run.loss_fn = _loss_then_sigterm

if os.environ.get("ABBA_TEST_SIGINT_IN_LOAD"):
    _load = models.load_configured_base

    def _sigint_then_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return _load(*args, **kwargs)

    models.load_configured_base = _sigint_then_load

if __name__ == "__main__":
    from abba_cli.cli import app

    app(prog_name="abba")
