"""Stand-ins for cut-cross-entropy's and Liger Kernel's entry points (neither runs without CUDA and triton): each
takes the library's own signature and computes the cross-entropy in float64, counting its calls. Shared by
test_fused_loss.py and chunk_worker.py (ABBA_TEST_FAKE_FUSED=1: a worker process of a distributed run)."""

from __future__ import annotations

import types

import torch.nn.functional as F


class Calls:
    n = 0


def _reference(e, c, targets, ignore_index, reduction):
    """The cross-entropy of e @ c.T in float64, cast back to the kernels' fp32 loss (gradients flow through)."""
    logits = e.double() @ c.double().T
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction).float()


def fake_cce() -> types.ModuleType:
    module = types.ModuleType("cut_cross_entropy")

    # cut-cross-entropy 25.1.1's signature (cut_cross_entropy/linear_cross_entropy.py)
    def linear_cross_entropy(
        e,
        c,
        targets,
        ignore_index=-100,
        softcap=None,
        reduction="mean",
        shift=False,
        filter_eps="high",
        impl="cce",
    ):
        Calls.n += 1
        assert filter_eps is None and softcap is None and not shift  # exact gradients, rows already shifted
        return _reference(e, c, targets, ignore_index, reduction)

    module.linear_cross_entropy = linear_cross_entropy
    return module


def fake_liger() -> dict[str, types.ModuleType]:
    functional = types.ModuleType("liger_kernel.transformers.functional")

    # liger-kernel 0.8.5's signature (liger_kernel/transformers/functional.py)
    def liger_fused_linear_cross_entropy(
        input, weight, target, bias=None, ce_weight=None, ignore_index=-100, lse_square_scale=0.0,
        label_smoothing=0.0, reduction="mean", softcap=None, return_z_loss=False, accum_dtype=None,
        use_token_scaling=False, return_token_accuracy=False, return_predicted_tokens=False, chunk_mem_const=1,
    ):  # fmt: skip
        Calls.n += 1
        assert bias is None and ce_weight is None and label_smoothing == 0.0 and not return_z_loss
        return _reference(input, weight, target, ignore_index, reduction)

    functional.liger_fused_linear_cross_entropy = liger_fused_linear_cross_entropy
    package, transformers = types.ModuleType("liger_kernel"), types.ModuleType("liger_kernel.transformers")
    package.transformers, transformers.functional = transformers, functional
    return {
        "liger_kernel": package,
        "liger_kernel.transformers": transformers,
        functional.__name__: functional,
    }


def fake_modules() -> dict[str, types.ModuleType]:
    """sys.modules entries that make both libraries importable."""
    return {"cut_cross_entropy": fake_cce(), **fake_liger()}
