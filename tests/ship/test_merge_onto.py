"""`abba merge --onto dequantized`: a quantized-base run merged into the weights it trained against computes what
trained (the quantized base + adapter); `--onto original` stays the default; both distances are recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

bnb = pytest.importorskip(
    "bitsandbytes", reason="bitsandbytes is not installed (the `quant` extra; `make test` installs it)"
)

from helpers import cli, cli_error_line, make_run  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from abba_cli.models.loading import load_base  # noqa: E402
from abba_cli.models.quantization import dequantized_weight  # noqa: E402
from abba_cli.ship.merge import METADATA, merge_run  # noqa: E402

ADAPTED = "model.layers.0.self_attn.q_proj"
NOT_ADAPTED = "model.layers.0.self_attn.k_proj"  # packed too, and must ship dequantized as well


def _quantized_run(tmp_path: Path, model_dir: Path, quantization: str) -> Path:
    """A run whose config.yaml says it trained on a `quantization` base (the factors are random, dW != 0)."""
    run = make_run(tmp_path / "run", model_dir, type="abba", r1=2, r2=2, target_modules=["q_proj", "v_proj"])
    config = {
        "model": {"name_or_path": str(model_dir), "quantization": quantization},
        "adapter": {"type": "abba", "r1": 2, "r2": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"recipe": "gsm8k_bundled_train"},
        "output_dir": str(run),
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


@pytest.fixture(scope="module")
def nf4_run(tiny_model_dir, tmp_path_factory) -> Path:
    return _quantized_run(tmp_path_factory.mktemp("nf4"), tiny_model_dir, "nf4")


def _packed_weights(model_dir: Path, quantization: str) -> dict[str, torch.Tensor]:
    model, _ = load_base(str(model_dir), "auto", quantization=quantization)
    return {n: dequantized_weight(model.get_submodule(n)) for n in (ADAPTED, NOT_ADAPTED)}


def test_dequantized_fp32_merge_computes_what_trained(tiny_model_dir, nf4_run, tmp_path):
    result = cli(
        "merge", "--out", tmp_path / "deq", "--run", nf4_run, "--onto", "dequantized", "--dtype", "fp32"
    )
    assert result.exit_code == 0, result.output
    assert (
        "what trained is reproduced" in result.output and "merged onto the dequantized base" in result.output
    )
    meta = json.loads((tmp_path / "deq" / METADATA).read_text())
    trained, original = meta["trained_on_quantized_base"], meta["original_base_plus_adapter"]
    assert meta["onto"] == "dequantized" and meta["check"]["passed"] and trained["passed"]
    # fp32 compute on both sides: the packed layers compute x·Wdeqᵀ, so only summation order differs.
    assert trained["max_rel_diff"] < 1e-5 and trained["top1_agreement"] == 1.0
    assert original["max_rel_diff"] > 100 * trained["max_rel_diff"]  # nf4 moved W0 by ~10%

    # On disk: the adapted layer is round(Wdeq + dW), the unadapted packed layer Wdeq, and nothing is quantized.
    merged = load_file(tmp_path / "deq" / "model.safetensors")
    wdeq = _packed_weights(tiny_model_dir, "nf4")
    torch.testing.assert_close(merged[f"{NOT_ADAPTED}.weight"], wdeq[NOT_ADAPTED], rtol=0, atol=0)
    onto_original = load_file(_original_merge(nf4_run, tmp_path))
    dw = onto_original[f"{ADAPTED}.weight"].double() - _tiny_weight(tiny_model_dir, ADAPTED).double()
    torch.testing.assert_close(
        merged[f"{ADAPTED}.weight"].double(), wdeq[ADAPTED].double() + dw, rtol=0, atol=1e-6
    )
    assert "quantization_config" not in json.loads((tmp_path / "deq" / "config.json").read_text())


def _tiny_weight(model_dir: Path, name: str) -> torch.Tensor:
    return load_file(model_dir / "model.safetensors")[f"{name}.weight"]


def _original_merge(run: Path, tmp_path: Path) -> Path:
    meta = merge_run(out=tmp_path / "orig", run=run, dtype="fp32")
    assert meta["onto"] == "original" and "passed" not in meta["trained_on_quantized_base"]
    # The default ships the unquantized base: far from what trained, exactly the original base + adapter.
    assert meta["original_base_plus_adapter"]["max_rel_diff"] == meta["check"]["max_rel_diff"] < 1e-4
    assert meta["trained_on_quantized_base"]["max_rel_diff"] > 1e-3
    return tmp_path / "orig" / "model.safetensors"


def test_dequantized_bf16_merge_agrees_within_bf16_rounding(nf4_run, tmp_path):
    meta = merge_run(out=tmp_path / "deq", run=nf4_run, dtype="bf16", onto="dequantized")
    trained = meta["trained_on_quantized_base"]
    assert meta["dtype"] == "bf16" and meta["check"]["passed"] and trained["passed"]
    assert trained["tolerance_rel"] == meta["check"]["tolerance_rel"]
    # bf16 rounding of W, the same size as the self-check's own distance
    assert trained["max_rel_diff"] < 2 * meta["check"]["max_rel_diff"] + 1e-3


def test_int8_dequantized_merge_reports_the_activation_rounding(tiny_model_dir, tmp_path):
    run = _quantized_run(tmp_path, tiny_model_dir, "int8")
    result = cli("merge", "--out", tmp_path / "deq", "--run", run, "--onto", "dequantized", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    assert "rounds activations" in result.output
    meta = json.loads((tmp_path / "deq" / METADATA).read_text())
    assert "passed" not in meta["trained_on_quantized_base"] and meta["check"]["passed"]
    assert (
        0
        < meta["trained_on_quantized_base"]["max_rel_diff"]
        < meta["original_base_plus_adapter"]["max_rel_diff"]
    )


def test_a_dequantized_merge_that_misses_what_trained_publishes_nothing(nf4_run, tmp_path, monkeypatch):
    import abba_cli.models.quantization as quant

    real = quant.dequantized_weight
    monkeypatch.setattr(quant, "dequantized_weight", lambda layer: real(layer) * 1.05)
    out = tmp_path / "deq"
    with pytest.raises(Exception, match="differ from the nf4 base \\+ adapter") as err:
        merge_run(out=out, run=nf4_run, dtype="fp32", onto="dequantized")
    assert "nothing was written" in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("onto", "quantized", "words"),
    [
        ("dequantized", False, ["--onto dequantized", "unquantized base", "--onto original"]),
        ("packed", True, ["--onto 'packed'", "original, dequantized"]),
    ],
)
def test_bad_onto_is_one_line_and_writes_nothing(tiny_model_dir, nf4_run, tmp_path, onto, quantized, words):
    run = nf4_run if quantized else make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=2, r2=2)
    out = tmp_path / "merged"
    result = cli("merge", "--out", out, "--run", run, "--onto", onto)
    assert result.exit_code == 2
    line = cli_error_line(result)
    assert all(w in line for w in words), line
    assert not out.exists()


def test_gguf_of_a_quantized_run_ships_what_trained(tiny_model_dir, nf4_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abba_cli.adapters import load_adapter
    from abba_cli.ship.merge_onto import packed_layers_as_trained

    out = tmp_path / "model.gguf"
    result = cli("export", "--format", "gguf", "--onto", "dequantized", "--out", out, "--run", nf4_run)
    assert result.exit_code == 0, result.output
    assert "what trained is reproduced" in result.output and "GGUF check passed" in result.output

    trained, tok = load_base(str(tiny_model_dir), "float32", quantization="nf4")
    load_adapter(trained, nf4_run)
    trained.eval()
    packed_layers_as_trained(trained)
    read = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype="float32").eval()
    ids = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)(
        "The answer is: 42", return_tensors="pt"
    )
    with torch.inference_mode():
        want, got = trained(**ids).logits, read(**ids).logits
    assert (
        float((want - got).abs().max() / want.abs().max()) < 1e-2
    )  # f16 rounding of what trained, nothing more
