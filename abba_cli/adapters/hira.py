"""HiRA: dW = s · W0 ⊙ (B A) (Huang et al., ICLR 2025), the paper's Hadamard baseline.

Its update is tied to W0, so it cannot be written as a low-rank adapter (no PEFT-LoRA export). Runs as one
custom function that builds W0 ⊙ (s B A) + W0 inside forward and rebuilds it in backward (no (m, n) tensor
is saved). Init: A Kaiming-uniform, B = 0, so dW = 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from abba_cli.adapters.base import AdapterLinear


class _MergedHiRA(Function):
    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, scaling, B, A):
        dtype = x.dtype
        w0 = weight.to(dtype)
        delta = (B.to(dtype) @ A.to(dtype)).mul_(w0).mul_(scaling)  # (m, n)
        b = None if bias is None else bias.to(dtype)
        if x_adapter is None:
            y = F.linear(x, delta.add_(w0), b)
        else:
            y = F.linear(x, w0, b) + F.linear(x_adapter, delta)
        ctx.save_for_backward(x, x_adapter, weight, B, A)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, x_adapter, weight, B, A = ctx.saved_tensors
        s, dtype = ctx.scaling, x.dtype
        m, n = weight.shape
        dy2 = dy.reshape(-1, m).to(dtype)
        w0 = weight.to(dtype)
        ba = B.to(dtype) @ A.to(dtype)  # (m, n), rebuilt
        dx = dxa = db = None
        if x_adapter is None:
            if ctx.needs_input_grad[0]:
                dx = (dy2 @ (ba * w0).mul_(s).add_(w0)).reshape(x.shape)
            src = x.reshape(-1, n)
        else:
            if ctx.needs_input_grad[0]:
                dx = (dy2 @ w0).reshape(x.shape)
            if ctx.needs_input_grad[1]:
                dxa = (dy2 @ (ba * w0).mul_(s)).reshape(x_adapter.shape)
            src = x_adapter.reshape(-1, n)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy2.sum(0)
        g = (dy2.T @ src).mul_(w0).mul_(s)  # dL/d(BA), (m, n)
        dB = (g @ A.to(dtype).T).to(B.dtype)
        dA = (B.to(dtype).T @ g).to(A.dtype)
        return dx, dxa, None, db, None, dB, dA


class HiRALinear(AdapterLinear):
    factor_names = ("A", "B")
    kind = "hira"

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        name: str = "",
        seed: int = 0,
        init: bool = True,
    ) -> None:
        super().__init__(base, scaling, dropout, name)
        self.r = r
        self._add_low_rank_pair(r)
        if init:
            self.reset_parameters(seed)

    def reset_parameters(self, seed: int = 0) -> None:
        self._reset_kaiming_a_zero_b(seed)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.weight.float() * (self.B.float() @ self.A.float())

    def adapter_forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(dtype)
        x_adapter = self.adapter_input(x)
        with torch.autocast(x.device.type, enabled=False):
            return _MergedHiRA.apply(
                x, None if x_adapter is x else x_adapter, self.weight, self.bias, self.scaling, self.B, self.A
            )

    @torch.no_grad()
    def unmerge(self) -> None:
        """W' = W0 ⊙ (1 + s B A), so W0 = W' / (1 + s B A): dW depends on W0 and cannot simply be subtracted."""
        if not self.merged:
            return
        factor = 1.0 + self.scaling * (self.B.float() @ self.A.float())
        self.weight.data = (self.weight.float() / factor).to(self.weight.dtype)
        self.merged = False
