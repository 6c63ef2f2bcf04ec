"""ABBA's initialisations: each starts at the base model exactly and lets every factor learn (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from abba_cli.adapters import ABBALinear, inject_adapters
from abba_cli.adapters.abba_init import ABBA_INITS
from abba_cli.config import AdapterConfig

M, N, T = 12, 9, 7


def _layer(init_method: str, r1: int = 3, r2: int = 2) -> ABBALinear:
    torch.manual_seed(0)
    layer = ABBALinear(nn.Linear(N, M), r1, r2, scaling=0.8, name="l", seed=3, init_method=init_method)
    return layer.double()


@pytest.mark.parametrize("init_method", ABBA_INITS)
def test_step0_output_is_the_base_and_every_factor_gets_a_gradient(init_method):
    layer = _layer(init_method)
    x = torch.randn(T, N, dtype=torch.float64)
    base = x @ layer.weight.T + layer.bias
    assert torch.equal(layer(x), base)  # exactly: one factor is zero, so dW is 0 with no rounding
    assert torch.count_nonzero(layer.delta_weight()) == 0
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).pow(2).sum().backward()
    assert any(torch.count_nonzero(p.grad) > 0 for p in layer.factors().values())
    opt.step()
    opt.zero_grad()
    layer(x).pow(2).sum().backward()
    for name, p in layer.factors().items():
        assert torch.count_nonzero(p.grad) > 0, f"{init_method}: d{name} is zero after one step"


def test_strategies_set_the_factors_they_describe():
    w = _layer("svd").weight.detach().float()
    u, s, vh = torch.linalg.svd(w)
    top = (u[:, :3] * s[:3]) @ vh[:3]
    svd = _layer("svd")
    torch.testing.assert_close((svd.B1 @ svd.A1).float(), top, atol=1e-4, rtol=1e-4)
    assert torch.count_nonzero(svd.B2) == 0
    second = _layer("svd_second", r1=2, r2=3)
    torch.testing.assert_close((second.B2 @ second.A2).float(), top, atol=1e-4, rtol=1e-4)
    assert torch.count_nonzero(second.B1) == 0
    minor = _layer("svd_minor")
    torch.testing.assert_close(
        (minor.B1 @ minor.A1).float(), (u[:, 6:9] * s[6:9]) @ vh[6:9], atol=1e-5, rtol=1e-4
    )
    zero_a2 = _layer("svd_zero_a2")
    assert torch.count_nonzero(zero_a2.A2) == 0 and torch.count_nonzero(zero_a2.B2) == M * 2
    a2 = _layer("svd_a2")
    torch.testing.assert_close(a2.A2.abs().float(), (s[:2, None].sqrt() * vh[:2]).abs(), atol=1e-4, rtol=1e-4)
    rand = _layer("random")
    assert not torch.allclose((rand.B1 @ rand.A1).float(), top, atol=1e-2)


def test_default_keeps_the_released_svd_init_and_injection_uses_the_configured_one():
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("q_proj", nn.Linear(N, M))
    inject_adapters(base, AdapterConfig(type="abba", r1=3, r2=2, init="svd_minor"), seed=1)
    assert base.q_proj.init_method == "svd_minor"
    torch.manual_seed(0)
    other = nn.Sequential()
    other.add_module("q_proj", nn.Linear(N, M))
    inject_adapters(other, AdapterConfig(type="abba", r1=3, r2=2), seed=1)
    assert other.q_proj.init_method == "svd"


def test_abba_inits_are_refused_for_other_methods():
    with pytest.raises(ValueError, match="is ABBA.s; lora takes default or pissa"):
        AdapterConfig(type="lora", r=4, init="svd_minor")
    with pytest.raises(ValueError, match="lora only"):
        AdapterConfig(type="abba", init="pissa")
