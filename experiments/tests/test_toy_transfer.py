"""The toy-transfer harness (experiments/toy_transfer.py) on one seed and a handful of steps."""

from __future__ import annotations

import math

import torch

from experiments import toy_transfer as T


def test_data_splits_are_disjoint_by_digit() -> None:
    data = T.load_data()
    assert int(data.pre_train.y.max()) <= 7 and int(data.pre_test.y.max()) <= 7
    for split in (data.new_train, data.new_val, data.new_test):
        assert set(split.y.tolist()) == {8, 9}
    assert data.pre_train.x.shape[1] == 64 and float(data.pre_train.x.max()) <= 1.0


def test_equal_budget_and_finite_metrics_for_every_method() -> None:
    data = T.load_data()
    lrs = {m: T.LR_GRID[m][1] for m in T.METHODS}
    results, pre_acc = T.run_seed(0, data, T.METHODS, lrs, r=4, hidden=16, steps=6)
    assert 0.0 <= pre_acc <= 1.0
    assert set(results) == set(T.METHODS)
    for m, res in results.items():
        assert res.steps == [0, 5, 6], m
        values = [*res.train_loss, *res.test_loss, *res.test_acc, res.val_loss, res.old_acc]
        assert all(math.isfinite(v) for v in values), m
    # (m + n) r per adapted layer: fc1 (16 x 64) and fc2 (10 x 16), the same for all three adapters
    budget = (16 + 64) * 4 + (10 + 16) * 4
    assert results["abba"].trainable == results["lora"].trainable == results["hira"].trainable == budget
    assert results["full"].trainable == sum(p.numel() for p in T.MLP(16).parameters())


def test_adapters_start_from_the_pretrained_function() -> None:
    # dW = 0 at step 0 for every adapter, so the adapted model equals the pre-trained one before training
    data = T.load_data()
    base = T.pretrain(data, hidden=16, seed=0, epochs=1)
    for m in ("abba", "lora", "hira"):
        model, params = T.prepare(base, m, r=4, seed=0)
        assert params and all(p.requires_grad for p in params)
        torch.testing.assert_close(model(data.new_test.x), base(data.new_test.x))
