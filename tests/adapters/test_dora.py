"""DoRA layer math against a float64 reference that forms W' = m (W0 + s B A) / ||W0 + s B A||, against PEFT's
own DoRA layer (forward, gradients, dropout), and merge / unmerge / save / load on a tiny model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from abba_cli.adapters import (
    DoRALinear,
    adapter_layers,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    trainable_summary,
    unmerge_adapters,
    unwrap_adapters,
)
from abba_cli.config import AdapterConfig

M, N, T, R, S = 12, 9, 7, 4, 0.8


def _randomise(layer: DoRALinear, seed: int = 0, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.A.copy_(torch.randn(layer.A.shape, generator=gen, dtype=layer.A.dtype) * scale)
        layer.B.copy_(torch.randn(layer.B.shape, generator=gen, dtype=layer.B.dtype) * scale)
        # Away from ||W0||, so that the magnitude's own effect is exercised too.
        layer.m.mul_(1 + 0.5 * torch.rand(layer.m.shape, generator=gen, dtype=layer.m.dtype))


def _layer(dtype=torch.float64, dropout: float = 0.0) -> DoRALinear:
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(N, M), R, scaling=S, dropout=dropout, name="l").to(dtype)
    _randomise(layer)
    return layer


def _reference(layer: DoRALinear, x: torch.Tensor):
    """float64 autograd through W' formed explicitly, the row norm detached (DoRA section 4.3)."""
    p = {k: v.detach().double().clone().requires_grad_(True) for k, v in layer.factors().items()}
    w = layer.weight.detach().double() + S * (p["B"] @ p["A"])  # (M, N)
    w_prime = (p["m"] / torch.linalg.vector_norm(w, dim=1).detach())[:, None] * w
    xr = x.detach().double().clone().requires_grad_(True)
    return xr @ w_prime.T + layer.bias.detach().double(), xr, p, w_prime


def test_forward_and_every_gradient_match_float64_reference():
    layer = _layer()
    x = torch.randn(2, T, N, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y_ref, xr, p, _ = _reference(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    for name in ("A", "B", "m"):
        torch.testing.assert_close(getattr(layer, name).grad, p[name].grad, rtol=1e-12, atol=1e-12)


def test_fp32_layer_is_within_fp32_rounding_of_the_reference():
    layer = _layer(torch.float32)
    x = torch.randn(T, N)
    y_ref = _reference(layer, x)[0]
    assert float((layer(x).detach().double() - y_ref).abs().max() / y_ref.abs().max()) < 1e-5


def _peft_twin(layer: DoRALinear, dropout: float):
    """PEFT's own DoRA on the same W0 with the same factors."""
    from peft import LoraConfig, get_peft_model

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(N, M).double()

        def forward(self, x):
            return self.q_proj(x)

    model = Wrap()
    with torch.no_grad():
        model.q_proj.weight.copy_(layer.weight)
        model.q_proj.bias.copy_(layer.bias)
    cfg = LoraConfig(r=R, lora_alpha=S * R, target_modules=["q_proj"], use_dora=True, lora_dropout=dropout)
    peft_model = get_peft_model(model, cfg)
    q = peft_model.base_model.model.q_proj
    with torch.no_grad():
        q.lora_A["default"].weight.copy_(layer.A)
        q.lora_B["default"].weight.copy_(layer.B)
        q.lora_magnitude_vector["default"].weight.copy_(layer.m)
    return peft_model, q


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_matches_peft_dora_in_forward_and_gradients(dropout):
    layer = _layer(dropout=dropout)
    peft_model, q = _peft_twin(layer, dropout)
    layer.train(), peft_model.train()
    x = torch.randn(T, N, dtype=torch.float64)
    torch.manual_seed(7)  # the same dropout mask: each draws one mask over x, from the same generator state
    y = layer(x)
    torch.manual_seed(7)
    y_peft = peft_model(x)
    torch.testing.assert_close(y, y_peft, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_peft * g).sum().backward()
    ours = (layer.A.grad, layer.B.grad, layer.m.grad)
    theirs = (
        q.lora_A["default"].weight.grad,
        q.lora_B["default"].weight.grad,
        q.lora_magnitude_vector["default"].weight.grad,
    )
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_init_starts_at_the_base_with_m_the_row_norms_of_w0():
    torch.manual_seed(0)
    base = nn.Linear(N, M)
    w0 = base.weight.detach().clone()
    layer = DoRALinear(base, R, scaling=S, name="l", seed=3)
    torch.testing.assert_close(layer.m.detach(), w0.norm(dim=1))
    assert torch.count_nonzero(layer.B) == 0 and torch.count_nonzero(layer.A) > 0
    x = torch.randn(T, N)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    layer(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.B, layer.m))


def test_merge_is_the_reference_weight_idempotent_and_unmerges_to_w0():
    layer = _layer()
    w0 = layer.weight.detach().clone()
    x = torch.randn(T, N, dtype=torch.float64)
    y, _, _, w_prime = _reference(layer, x)
    torch.testing.assert_close(layer.delta_weight().double(), (w_prime - w0).detach(), rtol=1e-6, atol=1e-6)
    layer.merge()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.weight.detach(), w_prime.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), y.detach(), rtol=1e-6, atol=1e-6)
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), y.detach(), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- whole-model behaviour


def _ids():
    return torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])


def test_model_round_trip_counts_and_files(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_logits = model(_ids()).logits
    cfg = AdapterConfig(type="dora", r=4, target_modules=["q_proj", "down_proj"])
    names = inject_adapters(model, cfg, seed=1)
    torch.testing.assert_close(model(_ids()).logits, base_logits, rtol=1e-5, atol=1e-5)  # W' = W0 at init
    layers = dict(adapter_layers(model))
    # r (m + n) + m per layer: the magnitude adds one parameter per output row.
    expected = sum(4 * (la.in_features + la.out_features) + la.out_features for la in layers.values())
    assert trainable_summary(model).trainable == expected
    for i, layer in enumerate(layers.values()):
        _randomise(layer, seed=i, scale=0.2)
    logits = model(_ids()).logits
    assert not torch.allclose(logits, base_logits, atol=1e-3)
    merge_adapters(model)
    torch.testing.assert_close(model(_ids()).logits, logits, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)

    save_adapter(model, cfg, tmp_path / "run", base_model=str(tiny_model_dir))
    stored = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[1] for k in stored} == {"A", "B", "m"}
    assert stored[f"{names[0]}.m"].shape == (layers[names[0]].out_features,)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert load_adapter(fresh, tmp_path / "run").type == "dora"
    torch.testing.assert_close(fresh(_ids()).logits, logits, rtol=1e-5, atol=1e-5)
    merge_adapters(fresh)
    unwrap_adapters(fresh)
    torch.testing.assert_close(fresh(_ids()).logits, logits, rtol=1e-5, atol=1e-5)


def test_rslora_and_default_alpha():
    from abba_cli.adapters import scaling_for

    assert scaling_for(AdapterConfig(type="dora", r=16)) == 2.0  # alpha 2r, s = alpha / r
    assert scaling_for(AdapterConfig(type="dora", r=16, alpha=8, use_rslora=True)) == 2.0  # 8 / sqrt(16)


def test_on_an_nf4_base_dora_is_exact_for_the_dequantized_weight(tiny_model_dir):
    """Row norms from the dequantized W0 (as PEFT's dequantize_module_weight), the base part through the packed
    matmul: forward and every gradient against float64 with Wdeq; merging into packed weights is refused."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (the `quant` extra)")
    from abba_cli.errors import UserError
    from abba_cli.models.loading import load_base
    from abba_cli.models.quantization import dequantized_weight

    model, _ = load_base(str(tiny_model_dir), "float32", quantization="nf4")
    inject_adapters(model, AdapterConfig(type="dora", r=3, target_modules=["down_proj"]), seed=0)
    layer = model.get_submodule("model.layers.1.mlp.down_proj")  # 64 x 128
    w = dequantized_weight(layer.quantized_base).double()
    torch.testing.assert_close(layer.m.detach().double(), w.norm(dim=1), rtol=1e-6, atol=1e-6)
    _randomise(layer, scale=0.2)
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = layer(x)
    p = {k: v.detach().double().clone().requires_grad_(True) for k, v in layer.factors().items()}
    wd = w + layer.scaling * (p["B"] @ p["A"])
    xr = x.detach().double().clone().requires_grad_(True)
    y_ref = xr @ ((p["m"] / wd.norm(dim=1).detach())[:, None] * wd).T
    assert float((y.detach().double() - y_ref.detach()).abs().max() / y_ref.abs().max()) < 1e-5
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y * g).sum().backward()
    (y_ref * g.double()).sum().backward()
    for ours, ref in [(layer.A.grad, p["A"].grad), (layer.B.grad, p["B"].grad), (layer.m.grad, p["m"].grad)]:
        assert float((ours.double() - ref).abs().max() / ref.abs().max()) < 1e-4
    assert float((x.grad.double() - xr.grad).abs().max() / xr.grad.abs().max()) < 1e-4
    with pytest.raises(UserError, match="quantized .bitsandbytes. weight; merging"):
        merge_adapters(model)


def test_compiles_fullgraph_under_autocast_and_matches_eager():
    import copy

    from abba_cli.adapters import compile_model

    eager = _layer(torch.float32)
    compiled = compile_model(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
    x = torch.randn(2, T, N, generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (eager, compiled):
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(xr)
        y.float().pow(2).sum().backward()
        outs.append((y.detach(), xr.grad, *(p.grad for p in model.factors().values())))
    assert (
        outs[0][0].dtype == torch.bfloat16 and outs[1][-1].dtype == torch.float32
    )  # m's gradient stays fp32
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


def test_train_then_merge_through_the_cli(tiny_model_dir, tmp_path):
    from helpers import UNSET, cli, tiny_config
    from transformers import AutoModelForCausalLM

    adapter = {"type": "dora", "r1": UNSET, "r2": UNSET, "r": 2}
    cfg = tiny_config(tmp_path, tiny_model_dir, "run", adapter=adapter, train={"max_steps": 2, "lr": 1e-2})
    result = cli("train", cfg)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    load_adapter(ours, run)
    m = dict(adapter_layers(ours))["model.layers.0.self_attn.q_proj"].m
    assert not torch.allclose(m, ours.get_submodule("model.layers.0.self_attn.q_proj").weight.norm(dim=1))
    result = cli("merge", "--run", run, "--out", tmp_path / "merged", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(_ids()).logits, ours(_ids()).logits, rtol=1e-5, atol=1e-5)


def test_row_norms_stay_fp32_under_bf16_autocast():
    layer = _layer(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norm = layer.weight_norm()
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, layer.weight_norm(), rtol=0, atol=0)
