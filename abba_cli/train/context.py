"""The run object: everything the training loop works on, built by the setup steps of `run_training`, and the
two seams a test or benchmark may replace (the loss, the stop request)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abba_cli.config import RunConfig
from abba_cli.train.loss import micro_batch_loss, target_loss_sum
from abba_cli.util.signals import GracefulStop


@dataclass
class TrainData:
    """The tokenized training and validation sets and the step counts derived from them."""

    train: Any
    val: Any  # None without data.val_samples / data.val_path
    collate: Callable
    per_epoch: int  # micro-batches per epoch (global: each holds micro_batch_size examples per process)
    total_steps: int
    warmup: int
    sha256: str  # of the training examples' fields, in order: --resume refuses changed data


@dataclass
class Run:
    """Everything the loop works on, built by the setup steps of `run_training`."""

    cfg: RunConfig
    run_dir: Path
    accelerator: Any
    model: Any
    tokenizer: Any
    params: list
    data: TrainData
    optimizer: Any
    scheduler: Any
    strategy: str = "ddp"  # distributed strategy: ddp | fsdp | zero2 | zero3 (train/distributed.py)
    state: Any = None  # checkpoint.TrainState, set by restore
    extends_from: int | None = None  # the old total of steps when --resume extends a run
    val_tracker: Any = None  # early_stopping.ValTracker: the best val_loss so far, the early-stopping count
    stop: GracefulStop | None = None  # catches SIGINT/SIGTERM while the loop runs
    loss_impl: str = "full"  # full | chunked: train.loss_impl resolved for this model (train/loss.py)

    @property
    def full(self) -> bool:
        return self.cfg.adapter.type == "full"

    @property
    def deepspeed(self) -> bool:
        return self.strategy in ("zero2", "zero3")

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    # Seams (as torchtune's recipe holds its `_loss_fn`): the loop calls these, and a test or benchmark that
    # needs another loss or a stop request replaces them on the class, not a private function of a module.
    def loss_fn(self, logits: Any, labels: Any) -> Any:
        """The summed loss of one micro-batch over its target tokens (train/loss.py)."""
        return target_loss_sum(logits, labels)

    def micro_batch_loss(self, batch: dict) -> Any:
        """Forward and summed loss of one micro-batch; the full loss goes through `loss_fn`."""
        return micro_batch_loss(self.model, batch, self.loss_impl, self.loss_fn)

    def stop_requested(self) -> bool:
        """Whether any process caught a stop signal; every process must agree, or the others hang in a
        collective."""
        requested = self.stop is not None and self.stop.requested
        if self.accelerator.num_processes == 1:
            return requested
        import torch

        flag = torch.tensor(int(requested), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "max").item())
