"""`abba merge --onto`: which base a quantized-base run's adapter is folded into.

original (the default): the unquantized checkpoint + dW. What most users expect to ship, but not what trained:
the adapter learned against the quantized weights, and their quantization error stays out of the merged model.
dequantized: the weights the adapter trained against, the packed layers dequantized (bitsandbytes' own
dequantize, through models.quantization.dequantized_weight) + dW, so the merged model computes what trained (4-bit: the packed
layers compute x·Wdeqᵀ exactly; int8's LLM.int8 also rounds the activations to 8 bits, which no dense model does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from abba_cli.errors import UserError

ONTO = ("original", "dequantized")
# Bases whose packed layers compute x·Wdeqᵀ exactly (fp32 compute), so a dequantized merge must reproduce them.
EXACT_DEQUANTIZED = ("nf4", "fp4")


def check_onto(onto: str, quantization: str | None, run_dir: Path) -> str:
    """`onto` checked against the run: UserError (one line) for an unknown value, or `dequantized` for a run whose
    base was not quantized (there is nothing to dequantize)."""
    key = str(onto).strip().lower()
    if key not in ONTO:
        raise UserError(f"--onto {onto!r}: expected one of {', '.join(ONTO)}")
    if key == "dequantized" and quantization is None:
        raise UserError(
            f"--onto dequantized: {run_dir} trained on an unquantized base (model.quantization none), which is "
            "already what it trained against; use the default --onto original"
        )
    return key


def load_dequantized_base(base: str, settings: dict[str, Any], quant: dict[str, Any]) -> tuple[Any, Any]:
    """(model, tokenizer): the base loaded quantized as the run loaded it, then every packed layer replaced by an
    nn.Linear holding its dequantized weight in fp32 (so W0 + dW is summed in fp32 and rounded once when folded);
    every other parameter keeps the checkpoint's dtype, as `--onto original` loads it."""
    import torch

    from abba_cli.models.loading import load_base
    from abba_cli.models.quantization import dequantized_weight, is_quantized_linear

    model, tokenizer = load_base(base, "auto", **settings, **quant)
    packed = [name for name, module in model.named_modules() if is_quantized_linear(module)]
    for name in packed:
        layer = model.get_submodule(name)
        with torch.device("meta"):
            dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        dense.weight = torch.nn.Parameter(dequantized_weight(layer), requires_grad=False)
        if layer.bias is not None:
            dense.bias = torch.nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        model.set_submodule(name, dense)
        del layer
    # A plain model from here on: save_pretrained must write no quantization_config.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def packed_layers_as_trained(model: Any) -> None:
    """Put every bitsandbytes layer in training mode (they hold no dropout: the mode only picks the kernel).

    In eval mode on avx512_bf16 CPUs, Linear4bit repacks its weight in place for a bf16 inference kernel and
    rounds the 4-bit scales to bf16 (0.3% off x·Wdeqᵀ); training never ran that kernel, so a reference of
    what trained must not either (adapter layers keep their packed base in training mode for the same reason).
    """
    from abba_cli.models.quantization import is_quantized_linear

    for module in model.modules():
        if is_quantized_linear(module):
            module.train(True)


def onto_record(
    onto: str, quant: dict[str, Any], to_trained: dict[str, Any], to_original: dict[str, Any], bound: float
) -> dict[str, Any]:
    """The merge report's entries: the merged model's logit distance to what trained (the quantized base +
    adapter), checked against `bound` when merged onto a dequantized 4-bit base, and to the original base +
    adapter."""
    trained = {**quant, **to_trained}
    if onto == "dequantized" and quant["quantization"] in EXACT_DEQUANTIZED:
        trained |= {"tolerance_rel": bound, "passed": to_trained["max_rel_diff"] <= bound}
    return {"trained_on_quantized_base": trained, "original_base_plus_adapter": to_original}


def report_onto(onto: str, record: dict[str, Any], dtype: str, shown_out: Path) -> None:
    """Print which base and both distances; UserError (nothing published) when a dequantized 4-bit merge does
    not reproduce what trained."""
    trained, original = record["trained_on_quantized_base"], record["original_base_plus_adapter"]
    quantization = trained["quantization"]
    base = (
        "the dequantized base it trained against"
        if onto == "dequantized"
        else "the original unquantized base"
    )
    print(
        f"merged onto {base}: its logits differ from the {quantization} base + adapter (what trained) by "
        f"{trained['max_rel_diff']:.3g} (relative; top-1 agreement {trained['top1_agreement']:.1%}) and from "
        f"the original base + adapter by {original['max_rel_diff']:.3g} (top-1 {original['top1_agreement']:.1%})"
    )
    if onto == "original":
        print("note: --onto dequantized ships the weights the adapter trained against instead")
    elif "passed" not in trained:
        print(f"note: {quantization} (LLM.int8) also rounds activations to 8 bits, which no dense model does")
    elif trained["passed"]:
        print(f"what trained is reproduced, within the {dtype} tolerance {trained['tolerance_rel']:.3g}")
    else:
        raise UserError(
            f"merge self-check failed: merged onto the dequantized base, the logits differ from the {quantization} "
            f"base + adapter by {trained['max_rel_diff']:.3g} (relative), above the {dtype} tolerance "
            f"{trained['tolerance_rel']:.3g}; nothing was written to {shown_out}"
        )
