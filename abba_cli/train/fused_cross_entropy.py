"""train.loss_impl cce | liger: the head projection and cross-entropy in fused GPU kernels, from cut-cross-entropy
(`linear_cross_entropy`) or Liger Kernel (`liger_fused_linear_cross_entropy`), behind the chunked loss's interface:
the same target rows (labels shifted, IGNORE_INDEX rows never projected), a sum over them (the caller divides by
the global batch's target tokens), the head's weight read whole through `gathered_weight` (so FSDP2 and ZeRO-3
gather it as for the chunked loss), and its gradient returned through one autograd function (tied embeddings
included).

Both libraries need CUDA and triton. The kernel runs once, in forward, with its gradients taken there (what Liger
does inside anyway): the head's weight is then gathered once per micro-batch, and backward only scales the saved
gradients. cut-cross-entropy runs with `filter_eps=None`: its default skips gradient entries it deems negligible,
which would make its gradients differ from the full loss's.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from abba_cli.train.linear_cross_entropy import gathered_weight, target_rows

FUSED_IMPLS = ("cce", "liger")
# loss_impl -> (the module it imports, the distribution pip installs, this package's extra)
_LIBRARIES = {
    "cce": ("cut_cross_entropy", "cut-cross-entropy", "cce"),
    "liger": ("liger_kernel", "liger-kernel", "liger"),
}


def fused_loss_unavailable(impl: str, device_type: str) -> str | None:
    """Why train.loss_impl `impl` cannot run here (None: it can): it needs CUDA, its library and triton."""
    module, dist, extra = _LIBRARIES[impl]
    if device_type != "cuda":
        return f"needs a CUDA GPU (training runs on {device_type} here)"
    if importlib.util.find_spec(module) is None:
        return f"needs {dist}, which is not installed (pip install 'abba-cli[{extra}]')"
    if importlib.util.find_spec("triton") is None:
        return f"needs triton for {dist}'s kernels, which is not installed (pip install triton)"
    return None


def library_kernel(impl: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """(rows (N, H), weight (V, H), targets (N,)) -> the summed cross-entropy of rows @ weight.T, from the
    library; every target is a class index (no IGNORE_INDEX: the caller kept target rows only)."""
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda rows, weight, targets: linear_cross_entropy(
            rows, weight, targets, reduction="sum", filter_eps=None
        )
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda rows, weight, targets: liger_fused_linear_cross_entropy(
        rows, weight, targets, reduction="sum", accum_dtype=torch.float32
    )


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ W.T, targets) by a library kernel; `weight` as in
    linear_cross_entropy.ChunkedLinearCrossEntropy (the head's weight when it trains, else None)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, head, kernel):  # hidden (N, H), targets (N,)
        device_type = hidden.device.type
        # The kernels take one dtype: the autocast dtype where autocast is on (as F.linear would cast to).
        dtype = (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        )
        wants_hidden, wants_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.enable_grad(), torch.autocast(device_type, enabled=False), gathered_weight(head) as whole:
            h = hidden.detach().requires_grad_(wants_hidden)
            w = whole.detach().requires_grad_(wants_weight)
            total = kernel(h.to(dtype), w.to(dtype), targets).float()
            wrt = [t for t in (h, w) if t.requires_grad]
            grads = list(torch.autograd.grad(total, wrt)) if wrt else []
        ctx.grad_hidden = grads.pop(0) if wants_hidden else None
        ctx.grad_weight = grads.pop(0) if wants_weight else None
        return total.detach()

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        ctx.grad_hidden = ctx.grad_weight = None
        return (
            None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * grad_total.to(grad_weight.dtype),
            None,
            None,
            None,
        )


def fused_cross_entropy_sum(hidden: torch.Tensor, labels: torch.Tensor, head: Any, impl: str) -> torch.Tensor:
    """The same sum as train/loss.py's `target_loss_sum`, computed by the `impl` library's kernel."""
    rows, targets = target_rows(hidden, labels)
    # Under no_grad (validation) nothing needs a gradient, so the kernel runs forward only.
    trains_weight = torch.is_grad_enabled() and head.weight.requires_grad
    weight = head.weight if trains_weight else None
    return FusedLinearCrossEntropy.apply(rows, weight, targets, head, library_kernel(impl))
