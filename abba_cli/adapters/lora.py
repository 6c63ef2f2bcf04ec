"""LoRA (dW = s · B A) and its PiSSA and rsLoRA variants: the paper's main baseline.

s = alpha / r, or alpha / sqrt(r) with rsLoRA. Default init: A Kaiming-uniform, B = 0.
PiSSA: B, A from W0's top-r singular triplets (scaled so s·B A equals them) and the frozen weight becomes the
residual W0 - s·B0 A0; B0, A0 are kept (and saved) so the adapter can be re-applied to the original W0 and the
merged weight is W0 + s(BA - B0A0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from abba_cli.adapters.base import AdapterLinear


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(AdapterLinear):
    factor_names = ("A", "B")
    kind = "lora"

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        init_method: str = "default",
        name: str = "",
        seed: int = 0,
        init: bool = True,
    ) -> None:
        super().__init__(base, scaling, dropout, name)
        self.r, self.init_method = r, init_method
        self._add_low_rank_pair(r)
        if init_method == "pissa":
            self.register_buffer("A0", torch.zeros_like(self.A.detach()))
            self.register_buffer("B0", torch.zeros_like(self.B.detach()))
        if init:
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        if self.init_method == "pissa":
            w = self.weight.detach().float()
            u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
            root = (sigma[: self.r] / self.scaling).sqrt()
            self.B.copy_(u[:, : self.r] * root)  # (m, r)
            self.A.copy_(root[:, None] * vh[: self.r])  # (r, n)
            self.B0.copy_(self.B)
            self.A0.copy_(self.A)
            self.apply_residual()
        else:
            self._reset_kaiming_a_zero_b(seed)

    @torch.no_grad()
    def apply_residual(self) -> None:
        """PiSSA: the frozen weight becomes W0 - s B0 A0 (call once, after B0/A0 are set)."""
        residual = self.weight.float() - self.scaling * (self.B0.float() @ self.A0.float())
        self.weight.data = residual.to(self.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.B.float() @ self.A.float())

    def adapter_forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(dtype)
        x_adapter = self.adapter_input(x)
        base = self.base_forward(x, dtype)
        return base + (x_adapter @ self.A.to(dtype).T) @ self.B.to(dtype).T * self.scaling  # (T,r) -> (T,m)
