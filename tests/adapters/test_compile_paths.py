"""torch.compile(fullgraph=True) traces every ABBA path, `auto` included, forward and backward, and matches eager.

The CPU backend is aot_eager (the graphs AOTAutograd builds, run op by op): it needs no C++ compiler, so the test
runs on a machine with only Python and pip; inductor compiles the same graphs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from abba_cli.adapters import ABBALinear, compile_model

PATHS = ["auto", "khatri_rao", "merged", "hybrid"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test traces from scratch: compiled code is cached per code object, across tests, up to a limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _stack(path: str, r1: int, r2: int, dropout: float = 0.0) -> nn.Sequential:
    """Two adapted layers of different shapes (a narrow one and a wide one) with non-zero factors."""
    torch.manual_seed(0)
    layers = [
        ABBALinear(nn.Linear(24, 40), r1, r2, 0.7, dropout, path, name="up"),
        nn.SiLU(),
        ABBALinear(nn.Linear(40, 24, bias=False), r1, r2, 0.7, dropout, path, name="down"),
    ]
    with torch.no_grad():
        for layer in layers[::2]:
            layer.B2.normal_(0, 0.3)
    return nn.Sequential(*layers)


def _step(model: nn.Module, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    y.float().pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), {"x": x.grad, **grads}


@pytest.mark.parametrize("path", PATHS)
# r1 == r2 under autocast is the shipped case (batched builds, casts); r1 != r2 in fp32 the other code (~30 s more)
@pytest.mark.parametrize(
    ("r1", "r2", "autocast"), [(3, 3, True), pytest.param(2, 5, False, marks=pytest.mark.slow)]
)
def test_every_path_compiles_fullgraph_and_matches_eager(path, r1, r2, autocast):
    eager = _stack(path, r1, r2)
    compiled = compile_model(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # compiled in place: same keys
    # Two token counts: the second recompiles with a symbolic T, which `auto`'s cost model must trace too.
    for tokens in (16, 40):
        x = torch.randn(2, tokens // 2, 24, generator=torch.Generator().manual_seed(tokens))
        y_ref, g_ref = _step(eager, x, autocast)
        y, g = _step(compiled, x, autocast)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        assert set(g) == set(g_ref) and all(v is not None for v in g.values())
        for name in g_ref:
            assert g[name].dtype == g_ref[name].dtype
            torch.testing.assert_close(g[name], g_ref[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["auto", "khatri_rao", "merged"])
def test_paths_with_adapter_dropout_compile_fullgraph(path):
    """Dropout makes the adapter's input differ from the frozen layer's; the masks are random, so this checks the
    trace and the gradients' presence, and eval mode (no dropout) against eager."""
    eager = _stack(path, 3, 3, dropout=0.1)
    compiled = compile_model(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 8, 24, generator=torch.Generator().manual_seed(0))
    _, g = _step(compiled, x, autocast=True)
    assert all(v is not None and torch.isfinite(v).all() for v in g.values())
    eager.eval()
    compiled.eval()
    torch.testing.assert_close(_step(compiled, x, True)[0], _step(eager, x, True)[0], rtol=0, atol=0)
