"""benchmarks/packing_loss.py's exact counts: the padding of each batching over an epoch."""

from __future__ import annotations

import pytest

from benchmarks import packing_loss as bench


def test_padding_counts_every_example_once_and_packs_by_hand():
    ds = {"length": [5, 3, 8, 2]}
    # First fit decreasing into rows of 8: [8], [5, 3], [2] -> 18 tokens in 3 x 8 slots.
    padding, batches = bench.padding_of("packing", ds, 2, 8)
    assert padding == pytest.approx(1 - 18 / 24)
    assert sorted(sorted(ds["length"][i] for i in row) for b in batches for row in b) == [[2], [3, 5], [8]]
    for name in ("plain", "grouped"):
        padding, batches = bench.padding_of(name, ds, 2, 8)
        rows = [row for b in batches for row in b]
        assert sorted(i for row in rows for i in row) == [0, 1, 2, 3] and all(len(r) == 1 for r in rows)
        padded = sum(max(ds["length"][r[0]] for r in b) * len(b) for b in batches)
        assert padding == pytest.approx(1 - 18 / padded)
    # Grouping pairs the two longest: (8, 5) and (3, 2) pad 3 + 1 tokens of 22 slots.
    assert bench.padding_of("grouped", ds, 2, 8)[0] == pytest.approx(1 - 18 / 22)
