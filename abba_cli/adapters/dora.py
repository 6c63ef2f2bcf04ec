"""DoRA: weight-decomposed LoRA (Liu et al., ICML 2024), the paper's magnitude/direction baseline.

    W' = m ⊙ (W0 + s B A) / ||W0 + s B A||        norm per output row (PEFT: `weight.norm(dim=1)`), m (out,)

The row norm is treated as a constant in backward (DoRA section 4.3, as PEFT does): A and B see the gradient of
g ⊙ (s B A x) with g = m / ||W0 + s B A|| fixed, m the gradient of g ⊙ (W0 + s B A) x. Init: LoRA's (A
Kaiming-uniform, B = 0) and m = ||W0|| per row, so W' = W0 at step 0. s = alpha / r (alpha / sqrt(r) with rsLoRA).

Forward as PEFT computes it: the base output x W0ᵀ is rescaled by g rather than W' being formed, so nothing of
size (out, in) is kept for backward; the row norm itself needs W0 + s B A once per call (under no_grad, freed at
once). With dropout on, PEFT's form: y = x W0ᵀ + b + (g - 1) ⊙ x' W0ᵀ + g ⊙ s x' (BA)ᵀ with x' the dropped input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from abba_cli.adapters.base import AdapterLinear


class DoRALinear(AdapterLinear):
    factor_names = ("A", "B", "m")
    kind = "dora"

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
        self.m = nn.Parameter(torch.ones(self.out_features, device=self.weight.device))  # (out,)
        # ||W0 + s B A|| per row at the time of merge(): unmerge needs it, and W' alone does not determine it.
        self._merged_norm: torch.Tensor | None = None
        if init:
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        self._reset_kaiming_a_zero_b(seed)
        self.m.copy_(torch.linalg.vector_norm(self.frozen_weight(), dim=1))  # B = 0: g = 1, W' = W0

    def _math_dtype(self) -> torch.dtype:
        # fp32 for the usual fp32 factors; float64 when the layer itself was cast to float64 (reference tests).
        return torch.promote_types(self.A.dtype, torch.float32)

    @torch.no_grad()
    def _base_and_updated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W0, W0 + s B A), (out, in), detached, in fp32 (float64 for a float64 layer); W0 dequantized on a
        packed base. Autocast off: B @ A would otherwise run in bf16, and the norms with it."""
        dt = self._math_dtype()
        w0 = self.frozen_weight() if self.quantized_base is not None else self.weight.detach()
        with torch.autocast(w0.device.type, enabled=False):
            w0 = w0.to(dt)
            return w0, w0 + self.scaling * (self.B.detach().to(dt) @ self.A.detach().to(dt))

    def weight_norm(self) -> torch.Tensor:
        """||W0 + s B A|| per output row, (out,), detached."""
        return torch.linalg.vector_norm(self._base_and_updated()[1], dim=1)

    def magnitude_scale(self) -> torch.Tensor:
        """g = m / ||W0 + s B A||, (out,): differentiable in m only."""
        return self.m / self.weight_norm().to(self.m.dtype)

    def delta_weight(self) -> torch.Tensor:
        w0, w = self._base_and_updated()
        g = self.m.detach().to(w.dtype) / torch.linalg.vector_norm(w, dim=1)
        return (g[:, None] * w - w0).float()

    def _w0_product(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x W0ᵀ without the bias (a packed base adds its bias inside its own forward: taken off again)."""
        if self.quantized_base is not None:
            y = self.quantized_base(x.to(dtype))
            return y if self.bias is None else y - self.bias.to(y.dtype)
        return F.linear(x, self.weight.to(dtype))

    def adapter_forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(dtype)
        x_adapter = self.adapter_input(x)
        g = self.magnitude_scale().to(dtype)  # (out,)
        lora = (x_adapter @ self.A.to(dtype).T) @ self.B.to(dtype).T * self.scaling  # (T,r) -> (T,out)
        bias = None if self.bias is None else self.bias.to(dtype)
        if x_adapter is x:
            y = g * (self._w0_product(x, dtype) + lora)  # x W'ᵀ without forming W'
        else:
            y = self._w0_product(x, dtype) + (g - 1) * self._w0_product(x_adapter, dtype) + g * lora
        return y if bias is None else y + bias

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        norm = self.weight_norm()
        super().merge()
        self._merged_norm = norm

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 = W' / g - s B A, with g from the row norms taken at merge time."""
        if not self.merged:
            return
        dt = self._math_dtype()
        g = self.m.detach().to(dt) / self._merged_norm
        w0 = self.weight.to(dt) / g[:, None] - self.scaling * (
            self.B.detach().to(dt) @ self.A.detach().to(dt)
        )
        self.weight.data = w0.to(self.weight.dtype)
        self.merged, self._merged_norm = False, None
