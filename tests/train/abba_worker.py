"""`abba ARGS...` as a subprocess (alone or as one process of a torchrun launch), with two test hooks that
act from inside the process, at a known point, through real signals. `train-each STRATEGY CONFIG...` trains
several configs in turn in the same processes (one launch instead of one per run: a torchrun start-up imports
torch, transformers and the engines again on every process).

- ABBA_TEST_SIGTERM_AT=N: the process of rank 1 sends itself SIGTERM during its N-th training micro-batch (inside
  the loss, through the run's `loss_fn` seam), so a stop lands at a known step on one process only: every process
  must still agree to stop after that step, checkpoint and exit (tests/train/test_distributed_strategies.py).
  With `train-each`, only in the run whose output folder is named ABBA_TEST_SIGTERM_RUN, counted from its start.
- ABBA_TEST_SIGINT_IN_LOAD=1: the process sends itself SIGINT as the base model starts loading
  (tests/cli/test_hostile_train.py).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from abba_cli.models import loading as models
from abba_cli.train.context import Run

_AT = int(os.environ.get("ABBA_TEST_SIGTERM_AT", "0"))
_armed = [not os.environ.get("ABBA_TEST_SIGTERM_RUN")]  # train-each arms it for the named run only
_calls = [0]

if _AT and os.environ.get("RANK") == "1":
    _loss_fn = Run.loss_fn

    def _loss_then_sigterm(self, logits, labels):
        import torch

        # Training micro-batches only: validation (eval_every) calls the same loss without gradients.
        _calls[0] += torch.is_grad_enabled()
        if _armed[0] and _calls[0] == _AT and torch.is_grad_enabled():
            os.kill(os.getpid(), signal.SIGTERM)
        return _loss_fn(self, logits, labels)

    Run.loss_fn = _loss_then_sigterm

if os.environ.get("ABBA_TEST_SIGINT_IN_LOAD"):
    _load = models.load_configured_base

    def _sigint_then_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return _load(*args, **kwargs)

    models.load_configured_base = _sigint_then_load


def train_each(strategy: str, configs: list[str]) -> int:
    """Train each config in turn under `strategy` in these processes; a stopped run ends the sequence with the
    CLI's own message and exit code."""
    from abba_cli.config import load_config
    from abba_cli.train.pipeline import run_training
    from abba_cli.train.run_sequence import one_process_group
    from abba_cli.util.signals import TrainingStopped

    with one_process_group() as fresh_state:
        for path in configs:
            cfg = load_config(path, [f"distributed.strategy={strategy}"])
            _armed[0] = Path(cfg.output_dir).name == os.environ.get(
                "ABBA_TEST_SIGTERM_RUN", Path(cfg.output_dir).name
            )
            _calls[0] = 0
            fresh_state()
            try:
                run_training(cfg, config_path=Path(path))
            except TrainingStopped as e:
                print(str(e), file=sys.stderr)
                return e.exit_code
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "train-each":
        sys.exit(train_each(sys.argv[2], sys.argv[3:]))
    from abba_cli.cli import app

    app(prog_name="abba")
