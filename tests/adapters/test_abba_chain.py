"""ABBA as a chain of K pairs (adapter.ranks): every path against a float64 reference that materialises dW,
the K-fold Khatri-Rao form, merge, save/load, export and inspect."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import cli, make_run, ours_vs_peft
from safetensors.torch import load_file
from torch import nn

from abba_cli.adapters import abba_scaling, inject_adapters, scaling_for
from abba_cli.adapters.abba import describe_paths, khatri_rao_factors
from abba_cli.adapters.chain import (
    ABBAChainLinear,
    _KhatriRaoChain,
    _MergedChain,
    chain_scaling,
    khatri_rao_chain,
)
from abba_cli.adapters.cost import chain_path_costs, choose_chain_path, path_costs
from abba_cli.analysis.spectra import inspect_run
from abba_cli.config import AdapterConfig
from abba_cli.ship.export import export_run

M, N, T = 12, 9, 7
RANKS = [3, 2, 4]  # unequal on purpose


def _chain_layer(path: str, ranks=RANKS, seed: int = 0) -> ABBAChainLinear:
    torch.manual_seed(0)
    layer = ABBAChainLinear(nn.Linear(N, M), ranks, scaling=0.7, path=path, name="l", init=False).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.factors().values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return layer


def _reference(layer: ABBAChainLinear, x: torch.Tensor, x_adapter: torch.Tensor | None = None):
    f = {k: v.detach().clone().requires_grad_(True) for k, v in layer.factors().items()}
    dw = layer.scaling * math.prod(f[f"B{i}"] @ f[f"A{i}"] for i in range(1, len(layer.ranks) + 1))
    xr = x.detach().clone().requires_grad_(True)
    xa = xr if x_adapter is None else x_adapter.detach().clone().requires_grad_(True)
    y = xr @ layer.weight.T + layer.bias + xa @ dw.T
    return y, xr, xa, f


@pytest.mark.parametrize("path", ["khatri_rao", "merged"])
def test_forward_and_every_gradient_match_float64_reference(path):
    layer = _chain_layer(path)
    x = torch.randn(2, T, N, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    up = torch.randn_like(y)
    (y * up).sum().backward()
    y_ref, x_ref, _, f_ref = _reference(layer, x)
    (y_ref * up).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for name, p in layer.factors().items():
        torch.testing.assert_close(p.grad, f_ref[name].grad, rtol=1e-11, atol=1e-11, msg=f"d{name}")
    assert layer.weight.grad is None  # the base stays frozen


@pytest.mark.parametrize("function", [_KhatriRaoChain, _MergedChain], ids=["khatri_rao", "merged"])
def test_dropout_input_paths_match_reference(function):
    """With adapter dropout the adapter sees x_a != x: y = x W0ᵀ + b + x_a dWᵀ, gradients to both inputs."""
    layer = _chain_layer("auto", seed=1)
    x = torch.randn(T, N, dtype=torch.float64, requires_grad=True)
    xa = torch.randn(T, N, dtype=torch.float64, requires_grad=True)
    factors = list(layer.factors().values())
    y = function.apply(x, xa, layer.weight, layer.bias, layer.scaling, *factors)
    up = torch.randn_like(y)
    (y * up).sum().backward()
    y_ref, x_ref, xa_ref, f_ref = _reference(layer, x, xa)
    (y_ref * up).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xa.grad, xa_ref.grad, rtol=1e-12, atol=1e-12)
    for name, p in layer.factors().items():
        torch.testing.assert_close(p.grad, f_ref[name].grad, rtol=1e-11, atol=1e-11, msg=f"d{name}")


def test_k_fold_khatri_rao_form_is_exact_and_reaches_rank_prod_r():
    gen = torch.Generator().manual_seed(0)
    m, n = 30, 28
    pairs = [
        (
            torch.randn(m, r, generator=gen, dtype=torch.float64),
            torch.randn(r, n, generator=gen, dtype=torch.float64),
        )
        for r in RANKS
    ]
    b, a = khatri_rao_chain(pairs)
    assert b.shape == (m, 24) and a.shape == (24, n)
    torch.testing.assert_close(b @ a, math.prod(bi @ ai for bi, ai in pairs), rtol=1e-12, atol=1e-12)
    assert torch.linalg.matrix_rank(b @ a) == 24  # prod r = 24 < min(m, n): random factors reach it
    # two pairs: the same factors as the ABBA layer's own Khatri-Rao form
    b2, a2 = khatri_rao_chain(pairs[:2])
    b_ref, a_ref = khatri_rao_factors(pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1])
    assert torch.equal(b2, b_ref) and torch.equal(a2, a_ref)


def test_merge_is_w0_plus_delta_idempotent_and_unmerges():
    layer = _chain_layer("auto")
    x = torch.randn(T, N, dtype=torch.float64)
    y = layer(x)
    w0 = layer.weight.detach().clone()
    delta = layer.delta_weight()  # fp32, as merge folds it
    torch.testing.assert_close(delta.double(), _reference_delta(layer), rtol=1e-6, atol=1e-6)
    layer.merge()
    layer.merge()
    assert torch.equal(layer.weight, (w0.float() + delta).double())
    torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)


def _reference_delta(layer: ABBAChainLinear) -> torch.Tensor:
    f = layer.factors()
    return layer.scaling * math.prod(f[f"B{i}"] @ f[f"A{i}"] for i in range(1, len(layer.ranks) + 1)).detach()


@pytest.mark.parametrize("init_method", ["svd", "random"])
def test_init_starts_at_the_base_and_every_factor_learns(init_method):
    torch.manual_seed(0)
    layer = ABBAChainLinear(nn.Linear(N, M), RANKS, 0.7, name="l", seed=2, init_method=init_method).double()
    x = torch.randn(T, N, dtype=torch.float64)
    assert torch.equal(layer(x), x @ layer.weight.T + layer.bias)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    layer(x).pow(2).sum().backward()
    assert all(torch.count_nonzero(p.grad) > 0 for p in layer.factors().values())


def test_scale_rule_generalises_eq_7():
    assert chain_scaling(4.0, [2, 8], "paper") == abba_scaling(4.0, 2, 8, "paper")  # K = 2: eq. 7 itself
    assert chain_scaling(2.0, [4, 4, 1], "paper") == 2.0**3 / 4.0  # alpha^K / sqrt(prod r)
    assert chain_scaling(9.0, [2, 2, 2, 2], "released") == 81.0  # sqrt(alpha) per pair: alpha^(K/2)
    assert scaling_for(AdapterConfig(ranks=[4, 4, 1], alpha=2.0)) == 2.0


def test_cost_model_for_chains_agrees_with_the_two_pair_model_and_prefers_merged_at_large_r():
    costs = chain_path_costs(576, 576, [16, 16], 512)
    two = path_costs(576, 576, 16, 16, 512, constants={**_cpu(), "LAUNCH_COST": 0.0})
    assert costs["khatri_rao"] == pytest.approx(two["khatri_rao"])
    assert costs["merged"] == pytest.approx(two["merged"])
    assert choose_chain_path(576, 576, [8, 8, 8, 8], 512) == "merged"  # R = 4096 > 576
    assert choose_chain_path(4096, 4096, [2, 2, 2], 512) == "khatri_rao"  # R = 8 on a wide layer


def _cpu():
    from abba_cli.adapters.cost import CPU_COSTS

    return dict(CPU_COSTS)


def test_injected_chain_saves_loads_exports_as_exact_lora_and_inspects(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", ranks=[2, 3, 2], target_modules=["q_proj"])
    meta = json.loads((run / "adapter_config.json").read_text())
    assert meta["ranks"] == [2, 3, 2] and "r1" not in meta
    assert meta["scaling"] == pytest.approx(4.0**3 / math.sqrt(12))
    stored = load_file(run / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[1] for k in stored} == {"B1", "A1", "B2", "A2", "B3", "A3"}

    out = tmp_path / "peft"
    export_run(format="peft-lora", out=out, run=run)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 12  # prod r
    diff, effect = ours_vs_peft(tiny_model_dir, run, out)  # PEFT serves the chain as a rank-12 LoRA
    assert effect > 1e-2 and diff < 1e-5

    result = cli("export", "--format", "peft-loha", "--run", str(run), "--out", str(tmp_path / "loha"))
    assert result.exit_code == 2 and "chain of 3 ABBA pairs" in result.output
    assert len(result.output.strip().splitlines()) == 1

    report = inspect_run(run)
    q = report.layers[0]
    assert q.rank_bound == 12 and q.singular_values.size == 12
    assert report.trainable == (2 + 3 + 2) * (64 + 64) * 2  # sum r (m + n) per q_proj, 2 blocks


def test_config_forms_and_refusals():
    assert AdapterConfig(ranks=[4, 2]).r1 == 4  # two pairs: the ABBA layer
    for bad, words in [
        (dict(ranks=[2, 2, 2], r1=2), "not both"),
        (dict(ranks=[3]), "at least two pairs"),
        (dict(ranks=[2, 2, 2], path="hybrid"), "two-pair path"),
        (dict(ranks=[2, 2, 2], init="svd_minor"), "defined for two pairs"),
        (dict(type="lora", ranks=[2, 2, 2]), "chain of ABBA pairs"),
    ]:
        with pytest.raises(ValueError, match=words):
            AdapterConfig(**bad)


def test_chain_layer_with_a_rank_too_large_for_a_layer_is_refused():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(N, M))
    with pytest.raises(Exception, match=r"adapter.ranks\[1\]=20"):
        inject_adapters(model, AdapterConfig(ranks=[2, 20, 2]), init=False)


def test_adapter_term_alone_for_a_quantized_base_matches_reference():
    """On a packed base the frozen matmul runs in bitsandbytes and the chain adds its term alone (weight None)."""
    layer = _chain_layer("khatri_rao", seed=2)
    x = torch.randn(T, N, dtype=torch.float64, requires_grad=True)
    factors = list(layer.factors().values())
    y = _KhatriRaoChain.apply(x, None, None, None, layer.scaling, *factors)
    up = torch.randn_like(y)
    (y * up).sum().backward()
    y_ref, x_ref, _, f_ref = _reference(layer, x)
    y_ref = y_ref - (x_ref @ layer.weight.T + layer.bias)
    (y_ref * up).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for name, p in layer.factors().items():
        torch.testing.assert_close(p.grad, f_ref[name].grad, rtol=1e-11, atol=1e-11, msg=f"d{name}")


def test_describe_paths_names_the_chain_layers():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(N, M))
    inject_adapters(
        model, AdapterConfig(ranks=[2, 2, 2], target_modules=["q_proj"], path="merged"), init=False
    )
    assert describe_paths(model, 512) == "ABBA execution at 512 tokens per micro-batch: merged on 1 (q_proj)"
