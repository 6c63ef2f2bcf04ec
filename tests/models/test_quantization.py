"""model.quantization (bitsandbytes): adapters on packed 4/8-bit layers, training, eval and merge, on the CPU.

References are built from the dequantized weight the packed layer holds (Wdeq), in float64 for the adapter part.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

bnb = pytest.importorskip(
    "bitsandbytes", reason="bitsandbytes is not installed (the `quant` extra; `make test` installs it)"
)

from helpers import UNSET, bundled_gsm8k_data, cli, reset_accelerate, tiny_config  # noqa: E402

from abba_cli.adapters import (  # noqa: E402
    ABBALinear,
    LoRALinear,
    adapter_layers,
    inject_adapters,
    merge_adapters,
    trainable_summary,
)
from abba_cli.config import AdapterConfig, validate_config  # noqa: E402
from abba_cli.errors import UserError  # noqa: E402
from abba_cli.models.loading import load_base  # noqa: E402
from abba_cli.models.quantization import dequantized_weight, is_quantized_linear  # noqa: E402

QUANTS = ("nf4", "fp4", "int8")


def _quantized(model_dir: Path, quantization: str, dtype: str = "float32", double_quant: bool = False):
    return load_base(str(model_dir), dtype, quantization=quantization, double_quant=double_quant)


def _randomize(layer, seed: int = 0, scale: float = 0.3) -> None:
    """Factors random (dW != 0) so that the adapter part of a forward is checked, not just the zero update."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.factors().values():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _abba_delta64(layer: ABBALinear) -> torch.Tensor:
    d = {k: v.detach().double() for k, v in layer.factors().items()}
    return layer.scaling * (d["B1"] @ d["A1"]) * (d["B2"] @ d["A2"])


# ------------------------------------------------------------------------------------------ injection


@pytest.mark.parametrize("quantization", QUANTS)
def test_injection_wraps_packed_layers_and_keeps_state_dict_keys(tiny_model_dir, quantization):
    model, _ = _quantized(tiny_model_dir, quantization)
    packed = {name: mod for name, mod in model.named_modules() if is_quantized_linear(mod)}
    assert len(packed) == 14  # 7 projections x 2 layers; lm_head stays unquantized (transformers' choice)
    keys = set(model.state_dict())
    inject_adapters(model, AdapterConfig(type="abba", r1=2, r2=2, path="auto"), seed=0)
    layers = dict(adapter_layers(model))
    assert set(layers) == set(packed)
    for name, layer in layers.items():
        assert layer.quantized_base is packed[name] and layer.weight is packed[name].weight
        assert not layer.weight.requires_grad
        # auto on a packed weight: the fused paths (W0 + dW) do not exist, whatever the token count.
        assert layer.path == "khatri_rao" and layer.resolved_path(100_000) == "khatri_rao"
    factor_keys = {f"{n}.{f}" for n, layer in layers.items() for f in layer.factor_names}
    assert set(model.state_dict()) - factor_keys == keys  # the base's keys (packed weights, quant state) stay


def test_summary_counts_the_weights_a_packed_model_stands_for(tiny_model_dir):
    cfg = AdapterConfig(type="abba", r1=2, r2=2)
    full, _ = load_base(str(tiny_model_dir), "float32")
    inject_adapters(full, cfg)
    packed, _ = _quantized(tiny_model_dir, "nf4")
    inject_adapters(packed, cfg)
    want, got = trainable_summary(full), trainable_summary(packed)
    assert (got.trainable, got.total) == (want.trainable, want.total)


# ------------------------------------------------------------------------------------------ forward and backward


@pytest.mark.parametrize(("quantization", "double_quant"), [("nf4", False), ("fp4", True)])
def test_4bit_forward_is_dequantized_weight_plus_adapter(tiny_model_dir, quantization, double_quant):
    """fp32 compute: the packed layer computes x·Wdeqᵀ exactly, the adapter s·x((B1A1)⊙(B2A2))ᵀ (float64 ref)."""
    model, _ = _quantized(tiny_model_dir, quantization, double_quant=double_quant)
    inject_adapters(model, AdapterConfig(type="abba", r1=2, r2=3), seed=0)
    layer = model.get_submodule("model.layers.1.mlp.down_proj")  # 64 x 128
    state = layer.weight.quant_state
    assert (state.quant_type, state.nested) == (quantization, double_quant)
    _randomize(layer)
    w = dequantized_weight(layer.quantized_base).double()
    original, _ = load_base(str(tiny_model_dir), "float32")
    w0 = original.get_submodule("model.layers.1.mlp.down_proj").weight.detach().double()
    assert 0.03 < float((w - w0).norm() / w0.norm()) < 0.2  # 4-bit: W0 moved by ~10%, as NF4/FP4 do
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = layer(x)
    ref = x.double() @ (w + _abba_delta64(layer)).T
    assert y.dtype == torch.float32
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_int8_forward_is_its_own_base_plus_adapter(tiny_model_dir):
    """LLM.int8 also quantizes the activations, so its base part is close to, not equal to, x·Wdeqᵀ; the adapter
    part on top is exact (float64 ref)."""
    model, _ = _quantized(tiny_model_dir, "int8")
    inject_adapters(model, AdapterConfig(type="abba", r1=2, r2=2), seed=0)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    _randomize(layer)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = layer.quantized_base(x)
        y = layer(x)
    w = dequantized_weight(layer.quantized_base).double()
    dense = x.double() @ w.T
    assert float((base.double() - dense).norm() / dense.norm()) < 2e-2
    adapter = x.double() @ _abba_delta64(layer).T
    assert float(((y - base).double() - adapter).abs().max() / adapter.abs().max()) < 1e-5


def test_gradients_reach_only_the_factors_and_match_float64(tiny_model_dir):
    model, tok = _quantized(tiny_model_dir, "nf4")
    inject_adapters(model, AdapterConfig(type="abba", r1=2, r2=2), seed=0)
    ids = tok("The answer is: 42", return_tensors="pt")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    factors = {f"{n}.{f}" for n, layer in adapter_layers(model) for f in layer.factor_names}
    assert with_grad == factors
    # B2 starts at 0, so its gradient is non-zero in every layer: layer 0's came back through layer 1's packed
    # matmuls (bitsandbytes' backward to the input).
    first = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert float(first.B2.grad.abs().sum()) > 0

    layer = model.get_submodule("model.layers.1.mlp.up_proj")  # 128 x 64
    _randomize(layer, seed=3)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    c = torch.randn(4, 128, generator=torch.Generator().manual_seed(5))
    for p in layer.factors().values():
        p.grad = None
    (layer(x) * c).sum().backward()
    w = dequantized_weight(layer.quantized_base).double()
    f64 = {k: v.detach().double().requires_grad_(True) for k, v in layer.factors().items()}
    delta = layer.scaling * (f64["B1"] @ f64["A1"]) * (f64["B2"] @ f64["A2"])
    ((x.double() @ (w + delta).T) * c.double()).sum().backward()
    for k, p in layer.factors().items():
        ref = f64[k].grad
        assert float((p.grad.double() - ref).abs().max() / ref.abs().max()) < 1e-4, k


def test_an_eval_pass_does_not_break_the_next_training_step(tiny_model_dir):
    """Linear4bit repacks its weight in place for a bf16 inference kernel without a backward when it runs in eval
    mode on an avx512_bf16 CPU (bitsandbytes 0.50); after a validation pass, training would then get no gradient
    through W0 and a wrong dequantized weight. Wrapped layers keep bitsandbytes in training mode."""
    model, _ = _quantized(tiny_model_dir, "nf4")
    inject_adapters(model, AdapterConfig(type="abba", r1=2, r2=2), seed=0)
    layer = model.get_submodule("model.layers.1.self_attn.q_proj")
    _randomize(layer, seed=6)
    w = dequantized_weight(layer.quantized_base).double()
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(7))
    model.eval()
    with torch.no_grad():
        layer(x)  # what val_loss and generation do
    model.train()
    xg = x.clone().requires_grad_(True)
    c = torch.randn(6, 64, generator=torch.Generator().manual_seed(8))
    y = layer(xg)
    (y * c).sum().backward()
    full = w + _abba_delta64(layer)
    ref_y, ref_dx = x.double() @ full.T, c.double() @ full
    assert float((y.detach().double() - ref_y).abs().max() / ref_y.abs().max()) < 1e-5
    assert float((xg.grad.double() - ref_dx).abs().max() / ref_dx.abs().max()) < 1e-5
    assert torch.equal(dequantized_weight(layer.quantized_base).double(), w)


# ------------------------------------------------------------------------------------------ initialisation


def test_abba_init_is_the_svd_of_the_dequantized_weight(tiny_model_dir):
    """B1A1 is the same (seeded) top-r1 SVD an unquantized layer holding Wdeq gets, and not the one of the
    checkpoint's W0: the init reads the weight the packed layer really computes with (QPiSSA's choice)."""
    name = "model.layers.0.mlp.gate_proj"
    model, _ = _quantized(tiny_model_dir, "nf4")
    inject_adapters(model, AdapterConfig(type="abba", r1=4, r2=2), seed=7)
    layer = model.get_submodule(name)

    def init_on(weight: torch.Tensor) -> ABBALinear:
        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        lin.weight.data = weight.clone()
        return ABBALinear(lin, 4, 2, layer.scaling, name=name, seed=7)

    on_deq = init_on(dequantized_weight(layer.quantized_base))
    for k in ("B1", "A1", "A2"):
        assert torch.equal(getattr(layer, k), getattr(on_deq, k)), k
    original, _ = load_base(str(tiny_model_dir), "float32")
    on_w0 = init_on(original.get_submodule(name).weight.detach())
    assert not torch.allclose(layer.B1 @ layer.A1, on_w0.B1 @ on_w0.A1, rtol=1e-2, atol=1e-3)
    assert float(layer.B2.detach().abs().sum()) == 0  # dW = 0 at step 0


def test_lora_pissa_on_a_packed_base_starts_at_the_packed_model(tiny_model_dir):
    """PiSSA's residual is never written into W0 (adapters/lora.py), so it works on a packed weight: B0A0 are
    Wdeq's top-r singular triplets and the step-0 model is exactly the quantized base."""
    model, tok = _quantized(tiny_model_dir, "nf4")
    ids = tok("Natalia sold clips", return_tensors="pt")["input_ids"]
    # Training mode (no dropout in this model): in eval mode on avx512_bf16 CPUs a bare Linear4bit switches to
    # a bf16 inference kernel (2% off here), which adapter-wrapped layers never use (adapters/base.py).
    model.train()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    inject_adapters(model, AdapterConfig(type="lora", r=4, init="pissa"), seed=0)
    layer = model.get_submodule("model.layers.1.self_attn.o_proj")
    assert isinstance(layer, LoRALinear) and layer.quantized_base is not None
    w = dequantized_weight(layer.quantized_base).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    principal = layer.scaling * layer.B0.double() @ layer.A0.double()
    assert float((principal - (u[:, :4] * s[:4]) @ vh[:4]).norm() / principal.norm()) < 1e-5
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert float((after - before).abs().max() / before.abs().max()) < 1e-5


# ------------------------------------------------------------------------------------------ refusals


def test_packed_layers_are_never_merged_in_memory(tiny_model_dir):
    model, _ = _quantized(tiny_model_dir, "nf4")
    inject_adapters(model, AdapterConfig(type="abba", r1=2, r2=2))
    with pytest.raises(UserError, match="quantized .bitsandbytes. weight; merging"):
        merge_adapters(model)


def test_hira_on_a_packed_base_is_refused_by_the_library_api(tiny_model_dir):
    model, _ = _quantized(tiny_model_dir, "nf4")
    with pytest.raises(UserError, match="adapter.type hira multiplies its update by W0"):
        inject_adapters(model, AdapterConfig(type="hira", r=2))
    assert not any(True for _ in adapter_layers(model))  # nothing was swapped in


@pytest.mark.parametrize(
    ("model", "adapter", "words"),
    [
        ({"quantization": "nf4"}, {"type": "full"}, ["adapter.type 'full'", "packed", "abba or lora"]),
        ({"quantization": "int8"}, {"type": "hira"}, ["adapter.type 'hira'", "W0 itself"]),
        ({"quantization": "fp4"}, {"path": "merged"}, ["adapter.path 'merged'", "khatri_rao or auto"]),
        ({"quantization": "int8", "double_quant": True}, {}, ["model.double_quant", "nf4 or fp4"]),
        ({"quantization": "nf8"}, {}, ["model.quantization", "'none', 'nf4', 'fp4' or 'int8'"]),
    ],
)
def test_impossible_combinations_are_one_line_config_errors(model, adapter, words):
    raw = {
        "model": {"name_or_path": "x", **model},
        "adapter": adapter,
        "data": {"recipe": "gsm8k"},
        "output_dir": "o",
    }
    with pytest.raises(UserError) as e:
        validate_config(raw, "cfg.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cfg.yaml: ")
    for w in words:
        assert w in msg, msg


def test_missing_bitsandbytes_names_the_extra(tiny_model_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(UserError) as e:
        load_base(str(tiny_model_dir), quantization="nf4")
    assert "pip install 'abba-cli[quant]'" in str(e.value) and "model.quantization 'nf4'" in str(e.value)


def test_a_device_bitsandbytes_cannot_serve_is_refused_before_loading(tiny_model_dir, monkeypatch):
    from abba_cli.models import quantization as quant

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'bitsandbytes::dequantize_4bit' with arguments from 'Meta'")

    loaded = []
    monkeypatch.setattr(quant, "_probe", no_kernel)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: loaded.append(1))
    with pytest.raises(UserError) as e:
        load_base(str(tiny_model_dir), quantization="nf4")
    msg = str(e.value)
    assert "\n" not in msg and "cannot run on cpu with bitsandbytes" in msg and "dequantize_4bit" in msg
    assert "model.quantization: none" in msg and not loaded


def test_a_probe_that_runs_but_computes_garbage_is_refused(tiny_model_dir, monkeypatch):
    from abba_cli.models import quantization as quant

    monkeypatch.setattr(quant, "_probe", lambda *a, **k: 0.9)
    with pytest.raises(UserError, match="computes a quantized matmul 0.9 .relative."):
        quant.check_quantization("int8")


# ------------------------------------------------------------------------------------------ train, eval, merge


def _config(tmp_path: Path, model_dir: Path, quantization: str, **adapter) -> Path:
    # val_loss between steps: an eval-mode pass mid-training (bitsandbytes would repack 4-bit weights for a kernel
    # without backward there, see adapters/base.py); checkpointing: backward recomputes forwards.
    return tiny_config(
        tmp_path,
        model_dir,
        model={"dtype": UNSET, "quantization": quantization},
        adapter={"dropout": 0.1, "target_modules": UNSET, **adapter},
        data=bundled_gsm8k_data(8, val_samples=2),
        train={"max_steps": 3, "eval_every": 1, "gradient_checkpointing": True},
    )


@pytest.fixture
def fresh_accelerate():
    """Each run here starts from a fresh Accelerate state and leaves none behind (helpers.reset_accelerate)."""
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.parametrize(
    ("quantization", "adapter", "mixed_precision"),
    [("nf4", "abba", "no"), ("int8", "abba", "no"), ("nf4", "lora", "bf16")],
)
def test_train_eval_merge_on_a_quantized_base(
    tmp_path, tiny_model_dir, quantization, adapter, mixed_precision
):
    from safetensors.torch import load_file

    from abba_cli.eval.target import load_model_for_eval
    from abba_cli.ship.merge import merge_run

    ranks = {"r1": 2, "r2": 2} if adapter == "abba" else {"r1": None, "r2": None, "r": 4}
    cfg = _config(tmp_path, tiny_model_dir, quantization, type=adapter, **ranks)
    raw = yaml.safe_load(cfg.read_text())
    raw["adapter"] = {k: v for k, v in raw["adapter"].items() if v is not None}
    raw["train"]["mixed_precision"] = mixed_precision
    cfg.write_text(yaml.safe_dump(raw))
    result = cli("validate", cfg)
    assert result.exit_code == 0, result.output
    if adapter == "abba":  # the plan validate prints is the one training runs: no fused path on packed layers
        assert "khatri_rao on 14" in result.output
        assert "merged" not in result.output.split("ABBA execution")[1]
    result = cli("train", cfg)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all("val_loss" in m for m in metrics)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["quantization"] == quantization
    weights = load_file(run / "adapter_model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    trained = ".B2" if adapter == "abba" else ".B"  # zero at step 0
    assert all(float(w.abs().sum()) > 0 for k, w in weights.items() if k.endswith(trained))

    # eval: the run's base loads packed again and the adapter runs unmerged on it
    model, _, _ = load_model_for_eval(
        str(tiny_model_dir), run, {"dtype": "auto", "quantization": quantization}
    )
    layers = dict(adapter_layers(model))
    assert len(layers) == 14 and all(
        la.quantized_base is not None and not la.merged for la in layers.values()
    )

    # merge: the unquantized base + dW, with its self-check, and the distance to what trained recorded
    meta = merge_run(out=tmp_path / "merged", run=run, dtype="fp32")
    assert meta["check"]["passed"] and meta["layers_merged"] == 14
    q = meta["trained_on_quantized_base"]
    assert q["quantization"] == quantization and 0 < q["max_rel_diff"] < 1
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    w = merged["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == torch.float32 and w.shape == (64, 64)  # a plain fp32 checkpoint, nothing packed


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate")
def test_smollm2_nf4_run_merges_into_bf16(tmp_path, smollm2_dir):
    """The bundled SmolLM2 (a bf16 folder converted from its GGUF) quantizes on load, trains, and merges into
    its bf16 base; the merged model's distance to the nf4 base + adapter is recorded."""
    from abba_cli.ship.merge import merge_run

    cfg = _config(tmp_path, smollm2_dir, "nf4", dropout=0.0)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"].update(max_seq_len=256, drop_long=True)
    raw["train"].update(max_steps=2, eval_every=None, gradient_checkpointing=False)
    raw["data"].pop("val_samples")
    cfg.write_text(yaml.safe_dump(raw))
    result = cli("train", cfg)
    assert result.exit_code == 0, result.output
    meta = merge_run(out=tmp_path / "merged", run=tmp_path / "run", dtype="bf16")
    assert meta["check"]["passed"] and meta["dtype"] == "bf16"
    q = meta["trained_on_quantized_base"]
    # Measured: 0.54 relative, top-1 62% (the nf4 base alone is 0.57 / 60% from the bf16 one: SmolLM2-135M,
    # itself a dequantized Q4_1 GGUF, loses much to a second 4-bit grid); int8 is 0.05 / 90% there.
    assert q["quantization"] == "nf4" and 0 < q["max_rel_diff"] < 1 and q["top1_agreement"] > 0.3
