"""Per-step work outside the layers, made cheaper without changing what it decides."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from abba_cli.train.loop import all_finite

ONE_PROCESS = SimpleNamespace(num_processes=1, device=torch.device("cpu"))


def _params(bad: float | None = None, where: int = 5, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(7, 3, generator=gen, dtype=torch.float32).to(dtype) for _ in range(9)]
    ps.insert(3, torch.empty(0, dtype=dtype))  # a ZeRO-3 shard can be empty
    if bad is not None:
        ps[where].view(-1)[4] = bad
    return [torch.nn.Parameter(p, requires_grad=True) for p in ps]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 5, 9])
def test_one_non_finite_value_anywhere_is_caught(bad, where):
    assert not all_finite(_params(bad, where), ONE_PROCESS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_finite_weights_pass_even_near_the_dtype_limit(dtype):
    params = _params(dtype=dtype)
    with torch.no_grad():
        params[2].view(-1)[0] = torch.finfo(dtype).max  # finite: a norm that squares it would overflow
        params[4].view(-1)[1] = -torch.finfo(dtype).max
    assert all_finite(params, ONE_PROCESS)
    with torch.no_grad():
        params[7].view(-1)[3] = float("nan")
    assert not all_finite(params, ONE_PROCESS)


def test_only_empty_tensors_are_finite():
    assert all_finite([torch.empty(0), torch.empty(0, 4)], ONE_PROCESS)
