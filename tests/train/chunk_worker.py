"""`abba ARGS...` as a subprocess (alone or one process of a torchrun launch) whose chunked loss takes chunks of
ABBA_TEST_CHUNK_TOKENS tokens, so a tiny model's micro-batch spans several (and processes differ in how many);
with ABBA_TEST_FAKE_FUSED=1, train.loss_impl cce / liger run on the CPU through float64 stand-ins of the libraries
(fake_fused_kernels.py)."""

from __future__ import annotations

import os

from abba_cli.train import linear_cross_entropy

if os.environ.get("ABBA_TEST_CHUNK_TOKENS"):
    linear_cross_entropy.MIN_CHUNK_TOKENS = int(os.environ["ABBA_TEST_CHUNK_TOKENS"])
    linear_cross_entropy.CHUNK_ELEMENTS = 0

if os.environ.get("ABBA_TEST_FAKE_FUSED"):
    import sys

    from fake_fused_kernels import fake_modules

    from abba_cli.train import fused_cross_entropy

    sys.modules.update(fake_modules())
    fused_cross_entropy.fused_loss_unavailable = lambda impl, device_type: None

if __name__ == "__main__":
    from abba_cli.cli import app

    app(prog_name="abba")
