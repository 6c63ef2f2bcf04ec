"""LoRA-Pro (Wang et al., ICLR 2025, arXiv 2407.18242): LoRA factors stepped so that the update of W = W0 + s B A
follows AdamW on the full weight as closely as a rank-r update can.

A LoRA step (dA, dB) moves W by s (B dA + dB A) to first order: the "equivalent gradient". Given a full-weight
direction G (m, n), the factor gradients whose equivalent gradient is closest to G in Frobenius norm are
(paper, Theorem 2.1), with P_B = B (BᵀB)⁻¹ Bᵀ:

    gA = (1/s²) (BᵀB)⁻¹ gA_lora + X A                    gA_lora = s Bᵀ G   (r, n)
    gB = (1/s²) (I - P_B) gB_lora (AAᵀ)⁻¹ - B X          gB_lora = s G Aᵀ   (m, r)

for any X (r, r); their equivalent gradient is P_B G + (I - P_B) G Aᵀ(AAᵀ)⁻¹A, the projection of G onto
{B M + N A}, whatever X is. Theorem 2.2 picks the X that keeps (gA, gB) closest to the plain LoRA gradients: the
solution of the Sylvester equation BᵀB X + X AAᵀ = -(1/s²) (BᵀB)⁻¹ gA_lora Aᵀ.

The step, as the authors' released code does it (their modified DeepSpeed, `lorapro_full_adjustment`):
  1. the equivalent gradient g~ of the adjusted LoRA gradients (G = the full gradient, known only through the LoRA
     gradients the backward pass gives, which are exactly s Bᵀ G and s G Aᵀ);
  2. AdamW's moments of g~ kept per layer at full size (m, n), and its direction G = m^ / (sqrt(v^) + eps);
  3. the closed form again, for that G, with X from the Sylvester equation; A and B step by lr times it (the
     reference then runs SGD), with AdamW's decoupled weight decay.
So the optimizer state is two (m, n) fp32 tensors per adapted layer, as in full fine-tuning with AdamW: the price
of following full AdamW, as the reference pays it. Where we differ from that code, on purpose: s is the run's
own (it hard-codes 16/8), the second moment stays fp32 (it accumulates in bf16), and gradient clipping acts on the
raw gradients before they enter the moments (as for AdamW), not on the final factor steps. (BᵀB)⁻¹ and (AAᵀ)⁻¹ are
regularised by 1e-8 I as there, which also covers step 1, when B = 0.

The r x r algebra runs in float64 (cheap, and BᵀB is ill-conditioned while B is small). The Sylvester equation
is solved by hand: BᵀB and AAᵀ are symmetric, so diagonalising both solves it elementwise on the device, with no
host copy for scipy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# Added to BᵀB and AAᵀ before inverting them (the reference code's delta).
RIDGE = 1e-8


def solve_sylvester_symmetric(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X with P X + X Q = C, for symmetric positive semi-definite P (r, r) and Q (k, k); where an eigenvalue pair
    sums to 0 the equation leaves X free and the (minimum-norm) 0 is taken."""
    lam, U = torch.linalg.eigh(P)
    mu, V = torch.linalg.eigh(Q)
    denom = lam.clamp_min(0)[:, None] + mu.clamp_min(0)[None, :]  # (r, k)
    Ct = U.T @ C @ V
    Xt = torch.where(denom > 0, Ct / denom.where(denom > 0, 1.0), 0.0)
    return U @ Xt @ V.T


class _Gram:
    """BᵀB and AAᵀ of one layer, in float64, with their regularised inverses."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        self.A, self.B = A.double(), B.double()
        self.BtB = self.B.T @ self.B  # (r, r)
        self.AAt = self.A @ self.A.T  # (r, r)
        eye = torch.eye(self.BtB.shape[0], dtype=torch.float64, device=A.device)
        self.BtB_inv = torch.linalg.inv(self.BtB + RIDGE * eye)
        self.AAt_inv = torch.linalg.inv(self.AAt + RIDGE * eye)


def adjusted_gradients(
    gram: _Gram, gA_lora: torch.Tensor, gB_lora: torch.Tensor, s: float, with_x: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gA, gB) of Theorem 2.1, float64; X of Theorem 2.2 when `with_x` (else X = 0: same equivalent gradient)."""
    B, A = gram.B, gram.A
    gA_lora, gB_lora = gA_lora.double(), gB_lora.double()
    gA = gram.BtB_inv @ gA_lora / s**2  # (r, n)
    proj = gB_lora - B @ (gram.BtB_inv @ (B.T @ gB_lora))  # (I - P_B) gB_lora, (m, r)
    gB = proj @ gram.AAt_inv / s**2  # (m, r)
    if with_x:
        X = solve_sylvester_symmetric(gram.BtB, gram.AAt, -(gram.BtB_inv @ gA_lora @ A.T) / s**2)  # (r, r)
        gA = gA + X @ A
        gB = gB - B @ X
    return gA, gB


def equivalent_gradient(
    A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float
) -> torch.Tensor:
    """s (B gA + gB A), (m, n): how a step along (gA, gB) moves W = W0 + s B A, to first order."""
    return torch.addmm(gB @ A, B, gA).mul_(s)


def describe_state(model: torch.nn.Module) -> str:
    """One line on the optimizer state LoRA-Pro will hold for `model`'s adapted layers (meta device is fine)."""
    from abba_cli.adapters import adapter_layers

    values = 2 * sum(layer.out_features * layer.in_features for _, layer in adapter_layers(model))
    return (
        f"LoRA-Pro keeps AdamW's two moments at each adapted weight's full size: {values:,} fp32 values "
        f"({values * 4 / 2**30:.2f} GiB), as full fine-tuning with AdamW would for these layers"
    )


class LoRAProAdamW(torch.optim.Optimizer):
    """AdamW on each layer's equivalent gradient, stepping LoRA factors by LoRA-Pro's closed form.

    `params` are the LoRA factors in pairs (A, B) of one layer after another, as `model.parameters()` yields
    them from LoRA layers (A registered before B); `scaling` is the s every layer applies.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        scaling: float,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        params = list(params)
        if len(params) % 2:
            raise ValueError("LoRA-Pro takes LoRA factors in (A, B) pairs: got an odd number of parameters")
        for A, B in zip(params[::2], params[1::2], strict=True):
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
                raise ValueError(f"LoRA-Pro: not an (A, B) pair: shapes {tuple(A.shape)}, {tuple(B.shape)}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.scaling = float(scaling)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim's signature
        if closure is not None:
            raise ValueError("LoRA-Pro does not take a closure")
        for group in self.param_groups:
            params = group["params"]
            for A, B in zip(params[::2], params[1::2], strict=True):
                if A.grad is None or B.grad is None:
                    continue
                self._step_layer(A, B, group)
        return None

    def _step_layer(self, A: torch.nn.Parameter, B: torch.nn.Parameter, group: dict) -> None:
        s, (beta1, beta2), lr = self.scaling, group["betas"], group["lr"]
        state = self.state[A]
        if not state:
            state["step"] = 0  # a Python int: no device sync to read it each step
            state["exp_avg"] = torch.zeros(B.shape[0], A.shape[1], dtype=A.dtype, device=A.device)  # (m, n)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        gram = _Gram(A, B)
        gA, gB = adjusted_gradients(gram, A.grad, B.grad, s, with_x=False)
        g_eq = equivalent_gradient(A, B, gA.to(A.dtype), gB.to(A.dtype), s)  # (m, n)
        state["step"] += 1
        step = state["step"]
        state["exp_avg"].lerp_(g_eq, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g_eq, g_eq, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        direction = state["exp_avg"] / (1 - beta1**step) / denom  # AdamW's step direction for W, (m, n)
        del g_eq, denom
        gA, gB = adjusted_gradients(gram, s * (B.T @ direction), s * (direction @ A.T), s)
        if group["weight_decay"]:
            A.mul_(1 - lr * group["weight_decay"])
            B.mul_(1 - lr * group["weight_decay"])
        A.add_(gA.to(A.dtype), alpha=-lr)
        B.add_(gB.to(B.dtype), alpha=-lr)
