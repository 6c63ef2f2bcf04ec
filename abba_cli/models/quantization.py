"""Quantized frozen bases (`model.quantization: nf4 | fp4 | int8`, bitsandbytes): what the device can do, the
transformers loading arguments, and the dequantized W0 that adapter initialisation reads.

transformers quantizes a normal checkpoint while it loads (`BitsAndBytesConfig`); the bundled SmolLM2 is a
converted bf16 folder by then (models.bundled_smollm2_dir), so it is quantized on load like any other base. Only
the frozen nn.Linear layers are packed; embeddings, norms and lm_head keep model.dtype, and the adapter factors
stay fp32. Nothing here runs unless a quantization is asked for: bitsandbytes is an optional extra.
"""

from __future__ import annotations

import sys
from typing import Any

from abba_cli.errors import UserError

QUANTIZATIONS = ("nf4", "fp4", "int8")
INSTALL_HINT = "install the `quant` extra: pip install 'abba-cli[quant]'"
# Compute dtype of the 4-bit matmuls when model.dtype is auto: QLoRA's choice, and what bf16-capable GPUs and
# avx512_bf16 CPUs run fastest. An explicit model.dtype is used as given.
DEFAULT_COMPUTE_DTYPE = "bfloat16"


def import_bitsandbytes(quantization: str) -> Any:
    """The bitsandbytes module, or a UserError saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise UserError(
            f"model.quantization {quantization!r} needs bitsandbytes, which cannot be imported ({err}); "
            + INSTALL_HINT
        ) from None
    return bitsandbytes


def quant_device() -> Any:
    """The device transformers puts a bitsandbytes model on when no device_map is given (its
    `update_device_map`): the current CUDA device, else XPU, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu", torch.xpu.current_device())
    return torch.device("cpu")


def compute_dtype(dtype: str) -> Any:
    import torch

    return getattr(torch, DEFAULT_COMPUTE_DTYPE if dtype == "auto" else dtype)


def check_quantization(quantization: str, dtype: str = "auto", double_quant: bool = False) -> None:
    """UserError, before any weights load, when bitsandbytes cannot quantize, run forward and backward here.

    Asks the installed bitsandbytes directly instead of keeping a table of versions and devices: one 64x64
    layer is quantized on the target device and run forward and backward in the compute dtype, and its output
    must match x·Wdeqᵀ (what a packed layer computes) to within the compute dtype's rounding.
    """
    if quantization == "none":
        return
    if quantization not in QUANTIZATIONS:
        raise UserError(
            f"model.quantization {quantization!r}: expected one of none, {', '.join(QUANTIZATIONS)}"
        )
    bnb = import_bitsandbytes(quantization)
    device = quant_device()
    cdtype = compute_dtype(dtype)
    try:
        error = _probe(bnb, quantization, device, cdtype, double_quant)
    except (
        Exception
    ) as err:  # bitsandbytes raises whatever its backend raises (NotImplementedError, RuntimeError)
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"model.quantization {quantization!r} cannot run on {device.type} with bitsandbytes "
            f"{bnb.__version__} and compute dtype {str(cdtype).removeprefix('torch.')} ({text}); use "
            "model.quantization: none, another model.dtype, or a CUDA GPU"
        ) from None
    if not error < 0.05:  # bf16 rounding of the check layer is ~0.5%; a broken kernel is off by O(1)
        raise UserError(
            f"model.quantization {quantization!r}: bitsandbytes {bnb.__version__} on {device.type} computes a "
            f"quantized matmul {error:.3g} (relative) away from its own dequantized weight; it is broken here, "
            "use model.quantization: none"
        )


def _probe(bnb: Any, quantization: str, device: Any, cdtype: Any, double_quant: bool) -> float:
    """Relative error of a quantized 64x64 layer against x·Wdeqᵀ, after a forward and backward on `device`."""
    import torch

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64, generator=gen) / 8
    layer = quantized_linear(bnb, weight, quantization, cdtype, double_quant).to(device)
    x = torch.randn(4, 64, generator=gen).to(device=device, dtype=cdtype).requires_grad_(True)
    y = layer(x)
    y.float().square().sum().backward()
    if x.grad is None or not torch.isfinite(x.grad).all():
        raise RuntimeError("no finite input gradient through the quantized layer")
    ref = x.detach().float() @ dequantized_weight(layer).T
    return float((y.detach().float() - ref).norm() / ref.norm())


def quantized_linear(bnb: Any, weight: Any, quantization: str, cdtype: Any, double_quant: bool) -> Any:
    """A bitsandbytes layer holding `weight` (out, in), quantized when moved to its device (bitsandbytes' way)."""
    import torch

    out_features, in_features = weight.shape
    if quantization == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(
            weight.to(torch.float16), requires_grad=False, has_fp16_weights=False
        )
        return layer
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=cdtype,
        compress_statistics=double_quant,
        quant_type=quantization,
    )
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=double_quant, quant_type=quantization
    )
    return layer


def from_pretrained_kwargs(quantization: str, dtype: str, double_quant: bool) -> dict[str, Any]:
    """`quantization_config` for AutoModelForCausalLM.from_pretrained ({} for none)."""
    if quantization == "none":
        return {}
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_compute_dtype=compute_dtype(dtype),
            bnb_4bit_use_double_quant=double_quant,
        )
    return {"quantization_config": config}


def quantize_empty_model(model: Any, quantization: str, dtype: str, double_quant: bool) -> None:
    """Swap a meta-device model's nn.Linear layers for bitsandbytes ones, as loading would (no weights are
    read): `abba validate` then plans the same adapters and paths as training will run."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    config = from_pretrained_kwargs(quantization, dtype, double_quant)["quantization_config"]
    # transformers never quantizes the output head (it keeps the logits' precision); neither does this.
    keep = [name for name in ("lm_head",) if hasattr(model, name)]
    replace_with_bnb_linear(model, modules_to_not_convert=keep, quantization_config=config)


def is_quantized_linear(module: Any) -> bool:
    """A bitsandbytes Linear4bit / Linear8bitLt (checked without importing bitsandbytes when it is not loaded)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_quantized_model(model: Any) -> bool:
    """Holds bitsandbytes layers, bare or under an adapter (then merging into packed weights is not possible)."""
    return any(
        is_quantized_linear(m) or getattr(m, "quantized_base", None) is not None for m in model.modules()
    )


def dequantized_weight(layer: Any) -> Any:
    """W0 of a bitsandbytes layer as fp32 (out, in), through transformers' (PEFT's) dequantize_bnb_weight."""
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    unpack_cpu_weight(layer)
    return dequantize_bnb_weight(layer.weight, getattr(layer, "state", None)).float()


def unpack_cpu_weight(layer: Any) -> None:
    """Undo bitsandbytes' CPU inference repacking of a 4-bit weight (done in place by Linear4bit.forward in
    eval mode on avx512_bf16 CPUs): in that layout dequantize_4bit does not apply and the matmul has no
    backward, so an adapter layer keeps its base in the canonical layout."""
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, state)
