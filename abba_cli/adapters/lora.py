"""LoRA (dW = s · B A) and its PiSSA and rsLoRA variants: the paper's main baseline.

s = alpha / r, or alpha / sqrt(r) with rsLoRA. Default init: A Kaiming-uniform, B = 0.
PiSSA: B, A from W0's top-r singular triplets (scaled so s·B A equals them); the frozen initial factors B0, A0
are kept (and saved) and the layer computes x W0ᵀ + s·x (BA - B0A0)ᵀ, so the merged weight is W0 + s(BA - B0A0).
The residual W0 - s·B0A0 is never stored as a weight: rounded to a bf16 base it would differ from the exact
residual that export and merge rebuild (7e-3 of the logits on SmolLM2), and W0 itself stays untouched. The price
is two rank-r matmuls per forward, the same as the trainable pair's.
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
            w = self.frozen_weight()
            u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
            root = (sigma[: self.r] / self.scaling).sqrt()
            self.B.copy_(u[:, : self.r] * root)  # (m, r)
            self.A.copy_(root[:, None] * vh[: self.r])  # (r, n)
            self.B0.copy_(self.B)
            self.A0.copy_(self.A)
        else:
            self._reset_kaiming_a_zero_b(seed)

    @property
    def pissa(self) -> bool:
        return self.init_method == "pissa"

    def delta_weight(self) -> torch.Tensor:
        if self.pissa:
            return self.scaling * (self.B.float() @ self.A.float() - self.B0.float() @ self.A0.float())
        return self.scaling * (self.B.float() @ self.A.float())

    def adapter_forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(dtype)
        x_adapter = self.adapter_input(x)
        y = self.base_forward(x, dtype)
        if self.pissa:
            # The frozen principal part leaves the base's input, not the dropped-out one: x (W0 - s B0A0)ᵀ.
            y = y - (x @ self.A0.to(dtype).T) @ self.B0.to(dtype).T * self.scaling  # (T,r) -> (T,m)
        return y + (x_adapter @ self.A.to(dtype).T) @ self.B.to(dtype).T * self.scaling  # (T,r) -> (T,m)
