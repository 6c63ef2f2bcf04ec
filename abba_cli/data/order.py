"""The order training reads its examples in: one seeded generator per epoch, so an epoch's order is a function
of (train.seed, epoch) only, never of how much global RNG was drawn before, and resuming is skipping ahead.

`batch_stream` yields each process's share of every global micro-batch, from any micro-batch number on;
`data.group_by_length` swaps the epoch's permutation for a length-grouped one drawn from the same generator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator every data-order draw of one epoch comes from (the one place its seed is formed)."""
    import torch

    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation drawn from the epoch's own generator."""
    import torch

    return torch.randperm(n, generator=epoch_generator(seed, epoch)).tolist()


def length_grouped_order(lengths: Sequence[int], seed: int, epoch: int, batch_size: int) -> list[int]:
    """An epoch order whose consecutive `batch_size` chunks hold examples of similar length (less padding).

    As transformers' LengthGroupedSampler does: a seeded permutation cut into mega-batches of 50 batches, each
    sorted by length, so batches stay random in what they hold; then the batches' order is shuffled by the
    same generator. A function of (lengths, seed, epoch) only: the same on every process and on resume.
    """
    import torch

    gen = epoch_generator(seed, epoch)
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    mega = 50 * batch_size
    order: list[int] = []
    for start in range(0, len(perm), mega):
        order.extend(sorted(perm[start : start + mega], key=lambda i: -lengths[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    # A short last batch stays last: with several processes the stream wraps the order to fill it.
    full = len(batches) - (len(batches[-1]) < batch_size) if batches else 0
    shuffled = torch.randperm(full, generator=gen).tolist()
    return [i for b in shuffled for i in batches[b]] + [i for b in batches[full:] for i in b]


def batch_stream(
    n: int,
    micro_batch_size: int,
    seed: int,
    world: int,
    rank: int,
    skip: int,
    per_epoch: int,
    lengths: list[int] | None = None,
) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, batch index, example indices of this process) from micro-batch number `skip` onward, forever.

    A global micro-batch holds micro_batch_size examples per process; with several processes the epoch's order
    wraps around to fill the last one, so every process always gets a full batch (as DistributedSampler does).
    """
    epoch, batch = divmod(skip, per_epoch)
    size = micro_batch_size * world
    while True:
        if lengths is None:
            order = epoch_order(n, seed, epoch)
        else:  # data.group_by_length
            order = length_grouped_order(lengths, seed, epoch, size)
        if world > 1:
            order = (order * math.ceil(per_epoch * size / n + 1))[: per_epoch * size]
        for b in range(batch, per_epoch):
            chunk = order[b * size : (b + 1) * size]
            yield epoch, b, chunk[rank * micro_batch_size : (rank + 1) * micro_batch_size]
        epoch, batch = epoch + 1, 0
