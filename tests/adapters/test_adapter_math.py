"""Adapter math against a float64 reference that materialises dW, plus injection, merge and save/load."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from abba_cli.adapters import (
    ABBALinear,
    HiRALinear,
    LoRALinear,
    abba_scaling,
    adapter_layers,
    choose_path,
    inject_adapters,
    load_adapter,
    lora_scaling,
    merge_adapters,
    save_adapter,
    trainable_summary,
    unmerge_adapters,
    unwrap_adapters,
)
from abba_cli.adapters import abba as abba_module
from abba_cli.adapters.abba import _HybridABBA, _KhatriRaoABBA, _MergedABBA, path_costs
from abba_cli.config import AdapterConfig
from abba_cli.errors import UserError

M, N, T = 12, 9, 7


def _randomise(layer: nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Non-zero values in every factor so every gradient term is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.factors().values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def _abba_layer(path: str, r1: int = 3, r2: int = 5, dtype=torch.float64) -> ABBALinear:
    torch.manual_seed(0)
    base = nn.Linear(N, M).to(dtype)
    layer = ABBALinear(base, r1, r2, scaling=0.7, path=path, name="layer")
    layer.to(dtype)
    _randomise(layer)
    return layer


def _reference_abba(layer: ABBALinear, x: torch.Tensor):
    """float64 autograd through an explicitly materialised dW."""
    factors = {k: v.detach().double().clone().requires_grad_(True) for k, v in layer.factors().items()}
    dw = layer.scaling * (factors["B1"] @ factors["A1"]) * (factors["B2"] @ factors["A2"])
    xr = x.detach().double().clone().requires_grad_(True)
    y = xr @ (layer.weight.double() + dw).T + layer.bias.double()
    return y, xr, factors


@pytest.mark.parametrize("path", ["khatri_rao", "merged", "hybrid"])
@pytest.mark.parametrize(("r1", "r2"), [(3, 5), (4, 4), (1, 6)])
def test_abba_forward_and_every_gradient_match_float64_reference(path, r1, r2):
    layer = _abba_layer(path, r1, r2)
    x = torch.randn(2, T, N, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()

    y_ref, x_ref, f_ref = _reference_abba(layer, x)
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for name, p in layer.factors().items():
        torch.testing.assert_close(p.grad, f_ref[name].grad, rtol=1e-11, atol=1e-11, msg=f"d{name}")
    assert layer.weight.grad is None and layer.bias.grad is None  # the base stays frozen


def test_every_path_passes_gradcheck_with_r1_ne_r2():
    gen = torch.Generator().manual_seed(1)
    B1, A1 = torch.randn(M, 2, generator=gen), torch.randn(2, N, generator=gen)
    B2, A2 = torch.randn(M, 3, generator=gen), torch.randn(3, N, generator=gen)
    x = torch.randn(T, N, generator=gen)
    w, b = torch.randn(M, N, generator=gen), torch.randn(M, generator=gen)
    xa = torch.randn(T, N, generator=gen)
    args = [t.double().requires_grad_(True) for t in (x, B1, A1, B2, A2)]
    xs = [t.double().requires_grad_(True) for t in (x, xa)]
    wd, bd = w.double(), b.double()
    assert torch.autograd.gradcheck(lambda x, *f: _KhatriRaoABBA.apply(x, None, wd, bd, 0.9, *f), args)
    assert torch.autograd.gradcheck(
        lambda x, xa, *f: _KhatriRaoABBA.apply(x, xa, wd, bd, 0.9, *f), [*xs, *args[1:]]
    )
    assert torch.autograd.gradcheck(
        lambda x, *f: _MergedABBA.apply(x, None, wd, bd, 0.9, *f), [args[0], *args[1:]]
    )
    assert torch.autograd.gradcheck(
        lambda x, xa, *f: _MergedABBA.apply(x, xa, wd, bd, 0.9, *f), [*xs, *args[1:]]
    )
    assert torch.autograd.gradcheck(lambda x, *f: _HybridABBA.apply(x, wd, bd, 0.9, *f), args)
    # the frozen weight and bias too, should a caller ever unfreeze them
    wb = [wd.clone().requires_grad_(True), bd.clone().requires_grad_(True)]
    assert torch.autograd.gradcheck(
        lambda x, w, b, *f: _HybridABBA.apply(x, w, b, 0.9, *f), [args[0], *wb, *args[1:]]
    )


def test_merged_path_with_dropout_input_matches_reference():
    """With dropout the adapter sees another input than the frozen layer: y = x W0ᵀ + b + x_a dWᵀ."""
    layer = _abba_layer("merged")
    x = torch.randn(T, N, dtype=torch.float64, requires_grad=True)
    xa = torch.randn(T, N, dtype=torch.float64, requires_grad=True)
    f = layer.factors()
    y = _MergedABBA.apply(x, xa, layer.weight, layer.bias, layer.scaling, f["B1"], f["A1"], f["B2"], f["A2"])
    y.sum().backward()
    # float64, written here (delta_weight() is fp32 by contract: too coarse for a float64 comparison)
    dw = layer.scaling * (f["B1"].double() @ f["A1"].double()) * (f["B2"].double() @ f["A2"].double())
    xr, xar = x.detach().requires_grad_(True), xa.detach().requires_grad_(True)
    y_ref = xr @ layer.weight.T + layer.bias + xar @ dw.T
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(xa.grad, xar.grad)


def test_dropout_is_applied_to_the_adapter_input_in_training_only():
    torch.manual_seed(0)
    layer = ABBALinear(nn.Linear(N, M), 2, 2, scaling=1.0, dropout=0.5, path="khatri_rao", name="l")
    _randomise(layer)
    x = torch.randn(T, N)
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(x)
    assert not torch.allclose(a, b)  # different dropout masks
    layer.eval()
    torch.testing.assert_close(layer(x), x @ (layer.weight + layer.delta_weight()).T + layer.bias)


def test_khatri_rao_factors_hand_computed():
    """B*[i, j*r2 + k] = B1[i, j] B2[i, k] and A*[j*r2 + k, c] = A1[j, c] A2[k, c], worked out by hand."""
    from abba_cli.adapters.abba import khatri_rao_factors

    B1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # (m=2, r1=2)
    B2 = torch.tensor([[5.0], [6.0]])  # (m=2, r2=1)
    A1 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 3.0]])  # (r1=2, n=3)
    A2 = torch.tensor([[2.0, 3.0, 4.0]])  # (r2=1, n=3)
    b_kr, a_kr = khatri_rao_factors(B1, A1, B2, A2)
    assert torch.equal(b_kr, torch.tensor([[5.0, 10.0], [18.0, 24.0]]))
    assert torch.equal(a_kr, torch.tensor([[2.0, 0.0, 8.0], [0.0, 3.0, 12.0]]))
    # (B1 A1) ⊙ (B2 A2) by hand: [[1,2,8],[3,4,18]] ⊙ [[10,15,20],[12,18,24]]
    assert torch.equal(b_kr @ a_kr, torch.tensor([[10.0, 30.0, 160.0], [36.0, 72.0, 432.0]]))


def test_init_gives_zero_update_and_gradients_reach_every_factor():
    """dW = 0 at step 0. Only B2 has a gradient then (every other factor's gradient carries B2 or B2A2, which
    are zero); after one optimizer step all four do. Zero B1 AND B2 would leave every gradient zero forever."""
    torch.manual_seed(0)
    layer = ABBALinear(nn.Linear(N, M), 3, 2, scaling=1.0, name="l", seed=0)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    assert torch.count_nonzero(layer.B1) > 0 and torch.count_nonzero(layer.A2) > 0
    # B1 A1 is W0's best rank-r1 approximation (SVD init)
    u, s, vh = torch.linalg.svd(layer.weight.detach())
    torch.testing.assert_close(layer.B1 @ layer.A1, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-4, rtol=1e-4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(T, N)
    layer(x).pow(2).sum().backward()
    grads = {k: torch.count_nonzero(v.grad).item() for k, v in layer.factors().items()}
    assert grads["B2"] > 0
    opt.step()
    opt.zero_grad()
    layer(x).pow(2).sum().backward()
    assert all(torch.count_nonzero(v.grad) > 0 for v in layer.factors().values())


def test_init_is_deterministic_per_seed_and_name():
    base = nn.Linear(N, M)
    a = ABBALinear(nn.Linear(N, M).requires_grad_(False), 2, 2, 1.0, name="x", seed=5)
    a.weight.data.copy_(base.weight.data)
    a.reset_parameters(5)
    b = ABBALinear(nn.Linear(N, M), 2, 2, 1.0, name="x", seed=5)
    b.weight.data.copy_(base.weight.data)
    b.reset_parameters(5)
    for k in a.factor_names:
        assert torch.equal(getattr(a, k), getattr(b, k))


# (adapter config, s worked out by hand): every case a different s, none of them 1.
SCALING_CASES = [
    (dict(type="abba", r1=2, r2=8, alpha=3.0), 2.25),  # paper eq. 7: 3^2 / sqrt(16)
    (dict(type="abba", r1=1, r2=4), 128.0),  # default alpha 16: 256 / sqrt(4)
    (dict(type="abba", r1=2, r2=8, alpha=3.0, scaling="released"), 3.0),  # s = alpha
    (dict(type="lora", r=4, alpha=12.0), 3.0),  # 12 / 4
    (dict(type="lora", r=4, alpha=12.0, use_rslora=True), 6.0),  # 12 / sqrt(4)
    (dict(type="lora", r=4), 2.0),  # default alpha 2r
    (dict(type="hira", r=4, alpha=6.0), 1.5),  # 6 / 4
]


@pytest.mark.parametrize(("adapter", "s"), SCALING_CASES, ids=[str(i) for i in range(len(SCALING_CASES))])
def test_scaling_formulas(adapter, s):
    """The s each injected layer multiplies its update by, from the config as a user writes it."""
    model = nn.Module()
    model.q_proj = nn.Linear(16, 12)
    inject_adapters(model, AdapterConfig(target_modules=["q_proj"], **adapter))
    assert model.q_proj.scaling == pytest.approx(s, rel=1e-12)
    cfg = AdapterConfig(**adapter)
    if cfg.type == "abba":
        assert abba_scaling(cfg.alpha, cfg.r1, cfg.r2, cfg.scaling) == pytest.approx(s, rel=1e-12)
    elif cfg.type == "lora":
        assert lora_scaling(cfg.alpha, cfg.r, cfg.use_rslora) == pytest.approx(s, rel=1e-12)


def test_cost_model_picks_merged_for_narrow_layers_and_factor_paths_for_wide_ones():
    assert choose_path(576, 576, 16, 16, 1024) == "merged"
    assert choose_path(4096, 4096, 4, 4, 256) == "khatri_rao"
    # small ranks and many tokens: the merged forward is free and two skinny gradient matmuls beat both six
    # of them and G = dyᵀx (measured on this cell: hybrid 41 ms, Khatri-Rao 47, merged 52, LoRA 50)
    assert choose_path(576, 576, 4, 4, 2048) == "hybrid"


def test_cost_model_prices_dropout():
    """With dropout the merged path needs three extra (m, n, T) matmuls and the hybrid path does not exist."""
    plain = path_costs(576, 1536, 16, 16, 1024)
    dropped = path_costs(576, 1536, 16, 16, 1024, dropout=True)
    assert set(plain) == {"khatri_rao", "merged", "hybrid"} and set(dropped) == {"khatri_rao", "merged"}
    assert dropped["merged"] - plain["merged"] == 2 * 576 * 1536 * 1024
    assert dropped["khatri_rao"] == plain["khatri_rao"]
    assert choose_path(1536, 576, 16, 16, 1024) != "khatri_rao"
    assert choose_path(1536, 576, 16, 16, 1024, dropout=True) == "khatri_rao"


def test_describe_paths_reports_the_cost_models_choice_per_layer_kind():
    from abba_cli.adapters.abba import describe_paths

    model = nn.Sequential()
    model.add_module("q_proj", ABBALinear(nn.Linear(576, 576), 16, 16, 1.0, name="q_proj", init=False))
    model.add_module("up_proj", ABBALinear(nn.Linear(576, 1536), 16, 16, 1.0, name="up_proj", init=False))
    assert (
        describe_paths(model, 1024)
        == "ABBA execution at 1024 tokens per micro-batch: merged on 2 (q_proj, up_proj)"
    )
    model.up_proj.dropout = nn.Dropout(0.05)  # dropout removes the fused paths where Khatri-Rao is cheaper
    line = describe_paths(model, 1024)
    assert "khatri_rao on 1 (up_proj)" in line and "merged on 1 (q_proj)" in line
    assert describe_paths(nn.Sequential(nn.Linear(2, 2)), 8) is None


def test_auto_dispatch_follows_the_cost_model(monkeypatch):
    """`auto` runs the function choose_path names, with dropout counted, and hybrid is never run without grad."""
    layer = _abba_layer("auto", 2, 3, dtype=torch.float32)
    x = torch.randn(T, N)
    calls = []
    for fn in (_KhatriRaoABBA, _MergedABBA, _HybridABBA):
        monkeypatch.setattr(
            fn, "apply", (lambda name, f: lambda *a: (calls.append(name), f(*a))[1])(fn.__name__, fn.apply)
        )
    for pick in ("khatri_rao", "merged", "hybrid"):
        monkeypatch.setattr(abba_module, "choose_path", lambda *a, pick=pick, **k: pick)
        calls.clear()
        layer(x).sum().backward()
        assert calls == [
            {"khatri_rao": "_KhatriRaoABBA", "merged": "_MergedABBA", "hybrid": "_HybridABBA"}[pick]
        ]
    seen = []
    monkeypatch.setattr(
        abba_module, "choose_path", lambda m, n, r1, r2, t, dropout, costs: seen.append(dropout) or "hybrid"
    )
    with torch.no_grad():
        calls.clear()
        layer(x)
        assert calls == ["_MergedABBA"]  # same forward, without saving x A*ᵀ
    layer.dropout = nn.Dropout(0.5)
    layer.train()
    layer(x)
    assert seen == [False, True]
    layer.path = "hybrid"  # forced hybrid under dropout runs the Khatri-Rao path
    calls.clear()
    layer(x).sum().backward()
    assert calls == ["_KhatriRaoABBA"]


@pytest.mark.parametrize("kind", ["lora", "hira"])
def test_baselines_forward_and_gradients_match_reference(kind):
    torch.manual_seed(0)
    base = nn.Linear(N, M).double()
    layer = (LoRALinear if kind == "lora" else HiRALinear)(base, 4, scaling=0.8, name="l").double()
    _randomise(layer)
    x = torch.randn(T, N, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.pow(2).sum().backward()
    A = layer.A.detach().clone().requires_grad_(True)
    B = layer.B.detach().clone().requires_grad_(True)
    w0 = layer.weight.detach()
    dw = 0.8 * (B @ A) * (w0 if kind == "hira" else 1.0)
    xr = x.detach().clone().requires_grad_(True)
    y_ref = xr @ (w0 + dw).T + layer.bias
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.A.grad, A.grad)
    torch.testing.assert_close(layer.B.grad, B.grad)


def test_pissa_starts_at_the_base_function_and_merges_to_w0_plus_update():
    torch.manual_seed(0)
    base = nn.Linear(N, M)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, 3, scaling=0.5, init_method="pissa", name="l")
    x = torch.randn(T, N)
    torch.testing.assert_close(layer(x), x @ w0.T + layer.bias, atol=1e-5, rtol=1e-5)
    _randomise(layer)
    layer.merge()
    expected = w0 + 0.5 * (layer.B @ layer.A - layer.B0 @ layer.A0)
    torch.testing.assert_close(layer.weight, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- whole-model behaviour


def _tiny(tiny_model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)


def _ids():
    return torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])


@pytest.mark.parametrize(
    "cfg",
    [
        AdapterConfig(type="abba", r1=4, r2=2, alpha=2.0),
        AdapterConfig(type="abba", r1=2, r2=3, path="khatri_rao", scaling="released", alpha=1.5),
        AdapterConfig(type="lora", r=4),
        AdapterConfig(type="lora", r=4, init="pissa"),
        AdapterConfig(type="hira", r=4),
    ],
    ids=["abba", "abba-kr-released", "lora", "pissa", "hira"],
)
def test_merge_unmerge_save_load_round_trip(tiny_model_dir, tmp_path, cfg):
    model = _tiny(tiny_model_dir)
    base_logits = model(_ids()).logits
    inject_adapters(model, cfg, seed=1)
    originals = {n: layer.weight.detach().clone() for n, layer in adapter_layers(model)}
    if cfg.init != "pissa":
        torch.testing.assert_close(model(_ids()).logits, base_logits)  # dW = 0 at init
    for i, (_, layer) in enumerate(adapter_layers(model)):
        # A trained-update magnitude (|s·B A| well below 1): HiRA's unmerge divides by 1 + s·B A.
        _randomise(layer, seed=i, scale=0.2)
    adapter_logits = model(_ids()).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)

    merge_adapters(model)
    merge_adapters(model)  # idempotent
    torch.testing.assert_close(model(_ids()).logits, adapter_logits, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    for name, layer in adapter_layers(model):
        torch.testing.assert_close(layer.weight, originals[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(_ids()).logits, adapter_logits, rtol=1e-5, atol=1e-5)

    save_adapter(model, cfg, tmp_path / "run", base_model=str(tiny_model_dir))
    fresh = _tiny(tiny_model_dir)
    loaded_cfg = load_adapter(fresh, tmp_path / "run")
    assert loaded_cfg.type == cfg.type
    torch.testing.assert_close(fresh(_ids()).logits, adapter_logits, rtol=1e-5, atol=1e-5)

    merge_adapters(fresh)
    unwrap_adapters(fresh)
    assert not any(True for _ in adapter_layers(fresh))
    assert all("B1" not in k and ".A" not in k for k in fresh.state_dict())
    torch.testing.assert_close(fresh(_ids()).logits, adapter_logits, rtol=1e-5, atol=1e-5)


def test_parameter_count_is_r1_plus_r2_times_m_plus_n(tiny_model_dir):
    model = _tiny(tiny_model_dir)
    shapes = {
        n: (m.out_features, m.in_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in AdapterConfig().target_modules
    }
    inject_adapters(model, AdapterConfig(r1=3, r2=5))
    summary = trainable_summary(model)
    assert summary.adapted_layers == len(shapes) == 14
    for name, (m, n) in shapes.items():
        assert summary.per_layer[name] == (3 + 5) * (m + n)
    assert summary.trainable == sum(summary.per_layer.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.{f}" for name in shapes for f in ("B1", "A1", "B2", "A2")
    }
    assert "%" in str(summary)


def test_bf16_base_with_fp32_adapters_trains(tiny_model_dir):
    model = _tiny(tiny_model_dir, torch.bfloat16)
    inject_adapters(model, AdapterConfig(r1=4, r2=4, alpha=4.0), seed=0)
    for _, layer in adapter_layers(model):
        assert all(p.dtype == torch.float32 for p in layer.factors().values())
        assert layer.weight.dtype == torch.bfloat16
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(2, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        assert loss.dtype == torch.bfloat16 or loss.dtype == torch.float32
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), f"{n} changed"


def test_autocast_runs_matmuls_in_bf16_and_keeps_fp32_gradients():
    torch.manual_seed(0)
    for path in ("merged", "khatri_rao", "hybrid"):
        layer = ABBALinear(nn.Linear(N, M), 2, 3, 1.0, path=path, name="l")
        _randomise(layer)
        x = torch.randn(T, N)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert all(p.grad.dtype == torch.float32 for p in layer.factors().values())


def test_injection_errors(tiny_model_dir):
    model = _tiny(tiny_model_dir)
    with pytest.raises(UserError, match="matches no nn.Linear.*q_proj"):
        inject_adapters(model, AdapterConfig(target_modules=["query_key_value"]))
    with pytest.raises(UserError, match="adapter.r1=65 is larger"):
        inject_adapters(model, AdapterConfig(r1=65, r2=2))
    with pytest.raises(UserError, match="not nn.Linear"):
        inject_adapters(model, AdapterConfig(target_modules=["mlp"]))
    inject_adapters(model, AdapterConfig(r1=2, r2=2))
    with pytest.raises(UserError, match="already has adapters"):
        inject_adapters(model, AdapterConfig(r1=2, r2=2))


def test_load_onto_other_shapes_and_corrupt_files_are_clear_errors(
    tiny_model_dir, tiny_model_dir_other, tmp_path
):
    model = _tiny(tiny_model_dir)
    cfg = AdapterConfig(r1=2, r2=2)
    inject_adapters(model, cfg)
    save_adapter(model, cfg, tmp_path / "run", base_model="tiny")
    with pytest.raises(UserError, match="another base model"):
        load_adapter(_tiny(tiny_model_dir_other), tmp_path / "run")
    weights = tmp_path / "run" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt"):
        load_adapter(_tiny(tiny_model_dir), tmp_path / "run")
    (tmp_path / "run" / "adapter_config.json").unlink()
    with pytest.raises(UserError, match="adapter_config.json: missing"):
        load_adapter(_tiny(tiny_model_dir), tmp_path / "run")


def test_saved_file_recomputes_delta_with_the_stored_scaling(tiny_model_dir, tmp_path):
    """Anyone can recompute dW = s (B1@A1) * (B2@A2) from the files alone."""
    import json

    from safetensors.torch import load_file

    model = _tiny(tiny_model_dir)
    cfg = AdapterConfig(r1=2, r2=3, alpha=3.0)
    inject_adapters(model, cfg)
    for _, layer in adapter_layers(model):
        _randomise(layer)
    save_adapter(model, cfg, tmp_path, base_model="tiny")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert meta["scaling"] == pytest.approx(9.0 / math.sqrt(6))
    name, layer = next(iter(adapter_layers(model)))
    t = {k: tensors[f"{name}.{k}"] for k in ("B1", "A1", "B2", "A2")}
    assert all(v.dtype == torch.float32 for v in t.values())
    torch.testing.assert_close(
        meta["scaling"] * (t["B1"] @ t["A1"]) * (t["B2"] @ t["A2"]), layer.delta_weight()
    )


def test_injected_layers_follow_the_model_mode(tiny_model_dir):
    """Injected into a model in eval mode (merge, evaluation), adapter dropout must stay off."""
    model = _tiny(tiny_model_dir).eval()
    inject_adapters(model, AdapterConfig(r1=2, r2=2, dropout=0.3))
    assert all(not layer.training and not layer.dropout.training for _, layer in adapter_layers(model))
    for _, layer in adapter_layers(model):
        _randomise(layer, scale=0.3)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, model(_ids()).logits, rtol=0, atol=0)
    model.train()
    assert all(layer.dropout.training for _, layer in adapter_layers(model))


def test_refused_layer_leaves_the_model_unchanged(tiny_model_dir):
    """r1=40 fits q_proj (64x64) but not k_proj (32x64): nothing may be swapped in before the refusal."""
    model = _tiny(tiny_model_dir)
    with pytest.raises(UserError, match="adapter.r1=40 is larger than .*k_proj"):
        inject_adapters(model, AdapterConfig(r1=40, r2=2))
    assert not list(adapter_layers(model))
    assert all(p.requires_grad for p in model.parameters())


def test_adapter_on_a_tied_lm_head_is_refused(tiny_model_dir):
    from conftest import build_tiny_llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = build_tiny_llama(len(tok), tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(UserError, match=r"lm_head's weight is tied to model\.embed_tokens\.weight"):
        inject_adapters(model, AdapterConfig(r1=2, r2=2, target_modules=["q_proj", "lm_head"]))
    assert not list(adapter_layers(model))
    inject_adapters(model, AdapterConfig(r1=2, r2=2))  # the default projections are not tied: fine
    untied = build_tiny_llama(len(tok))
    inject_adapters(untied, AdapterConfig(r1=2, r2=2, target_modules=["lm_head"]))
    assert [n for n, _ in adapter_layers(untied)] == ["lm_head"]


def test_failed_load_leaves_the_model_as_it_was(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tiny(tiny_model_dir)
    cfg = AdapterConfig(r1=2, r2=2)
    inject_adapters(model, cfg)
    save_adapter(model, cfg, tmp_path / "good", base_model="tiny")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_bytes(
        (tmp_path / "good" / "adapter_config.json").read_bytes()
    )
    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")
    tensors["model.layers.1.mlp.down_proj.B1"] = torch.zeros(64, 3)  # wrong rank in the last layer
    save_file(tensors, tmp_path / "bad" / "adapter_model.safetensors")

    fresh = _tiny(tiny_model_dir).eval()
    before = {n: type(m) for n, m in fresh.named_modules()}
    with pytest.raises(UserError, match="down_proj.B1 has shape"):
        load_adapter(fresh, tmp_path / "bad")
    assert {n: type(m) for n, m in fresh.named_modules()} == before
    assert all(p.requires_grad for p in fresh.parameters())
    load_adapter(fresh, tmp_path / "good")  # no "already has adapters"
    assert len(list(adapter_layers(fresh))) == 14


def test_pissa_on_a_bf16_base_computes_with_the_exact_residual():
    """The layer must compute x (W0 + s(BA - B0A0))ᵀ with W0 the bf16 weight as stored, as export and merge
    assume; a residual W0 - s B0A0 rounded to bf16 is off by bf16's rounding (~4e-3 of W)."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    w0 = base.weight.detach().double().clone()
    layer = LoRALinear(base, 4, scaling=0.5, init_method="pissa", name="l")
    assert torch.equal(layer.weight.double(), w0)  # the base weight itself is untouched
    _randomise(layer, scale=0.1)
    s = 0.5
    ref_w = w0 + s * (
        layer.B.double() @ layer.A.double() - layer.B0.double() @ layer.A0.double()
    )  # float64, written here
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = layer(x)  # fp32 input: fp32 compute
    ref = x.double() @ ref_w.T
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_adapter_init_does_not_depend_on_the_process_rng(tiny_model_dir):
    """Every process must start from the same factors: the SVD/Kaiming init is seeded per layer, not drawn
    from the global RNG that differs between processes."""
    from transformers import AutoModelForCausalLM

    from abba_cli.adapters import adapter_state_dict, inject_adapters
    from abba_cli.config import AdapterConfig

    cfg = AdapterConfig(type="abba", r1=2, r2=2, target_modules=["q_proj", "down_proj"])
    states = []
    for process_seed in (0, 12345):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        torch.manual_seed(process_seed)  # as if another process had consumed its RNG differently
        torch.rand(100)
        inject_adapters(model, cfg)
        states.append(adapter_state_dict(model))
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
