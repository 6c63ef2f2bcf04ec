"""Precision under sharding: the adapter factors stay fp32 (they are the master weights) and their gradients are
accumulated and reduced in fp32 under every engine, while the matmuls run in the autocast dtype.

- DDP: autocast (Accelerate's), parameters untouched, gradients fp32; its all-reduce is in the gradients' dtype.
- FSDP2: a `MixedPrecisionPolicy(param_dtype=None, reduce_dtype=float32)`. Accelerate's own policy for
  `mixed_precision: bf16` is (bf16, bf16): it would all-gather the fp32 factors as bf16 copies, compute their
  gradients in bf16, reduce-scatter them in bf16 and, between micro-batches of one step (`no_sync`), accumulate
  them in bf16. `param_dtype=None` keeps each parameter's own dtype (the frozen base as loaded, the factors
  fp32) and Accelerate's autocast does the compute cast, exactly as on one process.
- DeepSpeed ZeRO-2/3: its `bf16.enabled` casts every parameter, the fp32 factors included, to bf16 (fp32
  copies live only inside its optimizer) and reduces in bf16. So abba turns it off and enables DeepSpeed's
  `torch_autocast` instead: parameters keep their dtypes, the forward runs under autocast, and
  `lower_precision_safe_modules: []` keeps every gradient's reduction in its own (fp32) dtype;
  `data_types.grad_accum_dtype: fp32` makes the accumulation dtype explicit.
"""

from __future__ import annotations

from typing import Any

from abba_cli.errors import UserError

AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def fsdp_mixed_precision_policy() -> Any:
    """FSDP2's policy: no parameter cast (autocast computes), gradients reduced and accumulated in fp32."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)


def apply_deepspeed_precision(hf: dict, mixed_precision: str, config_file: str) -> None:
    """Set DeepSpeed's precision keys in `hf` (a DeepSpeed config) for train.mixed_precision, in place.

    A DeepSpeed config file may leave `bf16.enabled` / `fp16.enabled` out or `auto`; one that enables them is
    refused, since the adapter factors would then train as bf16/fp16 copies.
    """
    for key in ("bf16", "fp16"):
        enabled = hf.get(key, {}).get("enabled", "auto")
        if enabled not in ("auto", False) and str(enabled).lower() != "false":
            raise UserError(
                f"{config_file}: {key}.enabled is {enabled}; abba keeps the adapter factors fp32 under DeepSpeed "
                f"(train.mixed_precision runs as DeepSpeed's torch_autocast): set it to auto or false"
            )
        hf[key] = {**hf.get(key, {}), "enabled": False}
    hf.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    if mixed_precision in AUTOCAST_DTYPES:
        hf.setdefault(
            "torch_autocast",
            {
                "enabled": True,
                "dtype": AUTOCAST_DTYPES[mixed_precision],
                # DeepSpeed reduces the gradients of these modules' parameters in the autocast dtype; none.
                "lower_precision_safe_modules": [],
            },
        )
