"""The GPU check's loss stage: each train.loss_impl on one micro-batch's final hidden states, against `chunked`.

A Llama-3.2-1B-shaped output layer (hidden 2048, vocabulary 128,256, bf16 like the model) on 4,096 target rows, bf16
autocast as in training: the summed loss and its gradients for the hidden states and the head's weight (a trained
or tied head) through `full`, `chunked`, `cce` and `liger` (the last two where cut-cross-entropy / Liger Kernel
import on CUDA; otherwise the row says why not). Each row: the relative error of loss and gradients against
`chunked`, the median ms of forward + backward, and the peak memory above what was allocated before.

    python -m benchmarks.gpu_check --stages loss_impls --out loss.json      # (a stage of the GPU check)
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from benchmarks import common

IMPLS = ["full", "chunked", "cce", "liger"]
SIZES = {"full": dict(hidden=2048, vocab=128256, tokens=4096, repeats=5),
         "smoke": dict(hidden=64, vocab=256, tokens=64, repeats=2)}  # fmt: skip


def _inputs(sz: dict, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(1, sz["tokens"], sz["hidden"], generator=gen)).to(device, torch.bfloat16)
    labels = torch.randint(0, sz["vocab"], (1, sz["tokens"]), generator=gen).to(device)
    head = torch.nn.Linear(sz["hidden"], sz["vocab"], bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * sz["hidden"] ** -0.5)
    return hidden, labels, head.to(device, torch.bfloat16)


def _loss_fn(impl: str):
    from abba_cli.train.fused_cross_entropy import fused_cross_entropy_sum
    from abba_cli.train.linear_cross_entropy import chunked_cross_entropy_sum
    from abba_cli.train.loss import target_loss_sum

    if impl == "full":
        return lambda hidden, labels, head: target_loss_sum(head(hidden), labels)
    if impl == "chunked":
        return chunked_cross_entropy_sum
    return lambda hidden, labels, head: fused_cross_entropy_sum(hidden, labels, head, impl)


def _run(impl: str, hidden, labels, head, device: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One forward + backward: (loss, d loss / d hidden, d loss / d head.weight)."""
    h = hidden.detach().requires_grad_(True)
    head.weight.grad = None
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = _loss_fn(impl)(h, labels, head)
    loss.backward()
    return float(loss.detach()), h.grad, head.weight.grad


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))


def stage_loss_impls(smoke: bool, device: str) -> list[dict[str, Any]]:
    from abba_cli.train.fused_cross_entropy import FUSED_IMPLS, fused_loss_unavailable

    sz = SIZES["smoke" if smoke else "full"]
    hidden, labels, head = _inputs(sz, device)
    head.weight.requires_grad_(True)  # a trained (or tied) head: its gradient is compared too
    ref_loss, ref_dh, ref_dw = _run("chunked", hidden, labels, head, device)
    rows = []
    for impl in IMPLS:
        why = fused_loss_unavailable(impl, torch.device(device).type) if impl in FUSED_IMPLS else None
        if why:
            rows.append({"impl": impl, "skipped": why})
            continue
        try:  # a library that installed but fails here (its triton, this GPU) loses only its own row
            loss, dh, dw = _run(impl, hidden, labels, head, device)  # also the warm-up
        except Exception as err:  # noqa: BLE001
            rows.append({"impl": impl, "skipped": f"failed: {type(err).__name__}: {err}"[:300]})
            continue
        resting = common.reset_peak(device)
        times = [common.time_once(lambda impl=impl: _run(impl, hidden, labels, head, device), device)
                 for _ in range(sz["repeats"])]  # fmt: skip
        rows.append(
            {"impl": impl, "tokens": sz["tokens"], "vocab": sz["vocab"], "hidden": sz["hidden"],
             "loss_rel_err": abs(loss - ref_loss) / abs(ref_loss), "d_hidden_rel_err": _rel(dh, ref_dh),
             "d_weight_rel_err": _rel(dw, ref_dw), "ms": statistics.median(times) * 1e3,
             "peak_bytes": common.read_peak(device) - resting}
        )  # fmt: skip
    return rows
