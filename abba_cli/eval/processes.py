"""Evaluation shared by the processes of a launcher (`torchrun`, `accelerate launch`): each process generates
its share of the prompts on its own device, and the main process writes the one results folder.

Alone (no WORLD_SIZE), everything here is the identity: one process, every prompt, no collectives.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from abba_cli.adapters.fold import fold_device


@dataclass(frozen=True)
class EvalProcesses:
    rank: int
    count: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, lengths: Sequence[int]) -> list[int]:
        """Indices of the prompts this process generates: every count-th of them sorted by length (longest
        first), so each process gets about the same number and the same mix of long and short prompts."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        return sorted(order[self.rank :: self.count])

    def gather(self, item: Any) -> list[Any]:
        """Every process's `item`, in rank order (on every process)."""
        if self.count == 1:
            return [item]
        import torch.distributed as dist

        items: list[Any] = [None] * self.count
        dist.all_gather_object(items, item)
        return items

    def barrier(self) -> None:
        if self.count > 1:
            import torch.distributed as dist

            dist.barrier()


def eval_processes() -> EvalProcesses:
    """This process's place among the launcher's processes; joins their process group on first use."""
    count = int(os.environ.get("WORLD_SIZE", "1"))
    device = fold_device()
    if count == 1:
        return EvalProcesses(0, 1, device)
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's object collectives use the current device
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return EvalProcesses(dist.get_rank(), dist.get_world_size(), device)
