"""ABBA with a chain of K pairs: dW = s (B1 A1) ⊙ (B2 A2) ⊙ ... ⊙ (BK AK)   (`adapter.ranks: [r1, ..., rK]`).

B_k (m, r_k), A_k (r_k, n): sum(r_k)(m + n) parameters, rank up to prod(r_k). Two pairs are the ABBA layer itself
(abba.py, with its fused paths); this layer serves K >= 3.

K-fold Khatri-Rao form: (B1 A1) ⊙ ... ⊙ (BK AK) = B* A* with B* = B1 ⊙r ... ⊙r BK (m, R) and
A* = (A1ᵀ ⊙r ... ⊙r AKᵀ)ᵀ (R, n), R = prod(r_k), the index of B*'s columns r-major (r1 slowest). Entry-wise:
(B* A*)[i, c] = sum over (j1..jK) of prod_k B_k[i, j_k] A_k[j_k, c] = prod_k (B_k A_k)[i, c]. So the chain is
exactly a LoRA of rank R (how `abba export --format peft-lora` ships it).

Scale: paper eq. 7 scales each pair like rsLoRA, alpha / sqrt(r_k), so two pairs give alpha² / sqrt(r1 r2); the
same rule for K pairs gives s = alpha^K / sqrt(prod r_k). The released convention scales each pair by sqrt(alpha)
(s = alpha for two pairs), so K pairs give s = alpha^(K/2).

Two exact paths, custom autograd functions that save the input and the factors (plus the (T, R) activation
h = x A*ᵀ on the Khatri-Rao path) and rebuild B*, A* or the (m, n) products in backward, where the factor
gradients come from autograd through that rebuild (dL/dB* = s dyᵀh and dL/dA* = s (dy B*)ᵀ x on the Khatri-Rao
path; G = s dyᵀx on the merged one): no (m, n) matrix and no R-wide factor lives between forward and backward.
`auto` picks the cheaper per layer and call from cost.chain_path_costs.
"""

from __future__ import annotations

import math
from functools import reduce

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from abba_cli.adapters.abba_init import init_pairs
from abba_cli.adapters.base import AdapterLinear, layer_generator
from abba_cli.adapters.cost import choose_chain_path, cost_constants

CHAIN_PATHS = ("khatri_rao", "merged")


def chain_scaling(alpha: float, ranks: list[int], convention: str) -> float:
    """s for K pairs: paper alpha^K / sqrt(prod r_k) (eq. 7 per pair); released alpha^(K/2)."""
    if convention == "paper":
        return alpha ** len(ranks) / math.sqrt(math.prod(ranks))
    if convention == "released":
        return float(alpha ** (len(ranks) / 2))
    raise ValueError(f"unknown ABBA scaling convention {convention!r}")


def factor_names(k: int) -> tuple[str, ...]:
    return tuple(name for i in range(1, k + 1) for name in (f"B{i}", f"A{i}"))


def pair_count(names) -> int:
    """K of a stored factor set B1, A1, ..., BK, AK (0 when the names are not exactly that)."""
    names = set(names)
    k = sum(1 for n in names if n.startswith("B"))
    return k if names == set(factor_names(k)) else 0


def pairs_of(f: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(f[f"B{i}"], f[f"A{i}"]) for i in range(1, pair_count(f) + 1)]


def khatri_rao_chain(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B* (m, R), A* (R, n)) with B* A* = (B1 A1) ⊙ ... ⊙ (BK AK), R = prod r_k (r1's index slowest)."""

    def kr_b(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x[:, :, None] * y[:, None, :]).reshape(x.shape[0], -1)

    def kr_a(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x[:, None, :] * y[None, :, :]).reshape(-1, x.shape[1])

    return reduce(kr_b, [b for b, _ in pairs]), reduce(kr_a, [a for _, a in pairs])


def chain_product(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(B1 A1) ⊙ ... ⊙ (BK AK), (m, n)."""
    return reduce(torch.mul, [b @ a for b, a in pairs])


def _pairs(flat) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(flat[0::2], flat[1::2], strict=True))


def _leaves(factors, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Detached leaves of the stored factors (gradients come back in their dtype) and their compute-dtype casts."""
    leaves = [f.detach().requires_grad_(True) for f in factors]
    return leaves, [t.to(dtype) for t in leaves]


class _KhatriRaoChain(Function):
    """y = x W0ᵀ + b + s (x_a A*ᵀ) B*ᵀ. `weight` None: the adapter's term only (quantized base)."""

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, scaling, *factors):
        dtype, n = x.dtype, x.shape[-1]
        xa = x if x_adapter is None else x_adapter
        b_star, a_star = khatri_rao_chain(_pairs([f.to(dtype) for f in factors]))
        h = xa.reshape(-1, n) @ a_star.T  # (T, R)
        y = (h @ b_star.T).mul_(scaling)  # (T, m)
        if weight is not None:
            y += F.linear(x.reshape(-1, n), weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, x_adapter, h, weight, *factors)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], b_star.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, x_adapter, h, weight, *factors = ctx.saved_tensors
        s, dtype, n = ctx.scaling, h.dtype, x.shape[-1]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)  # (T, m)
        xa = x if x_adapter is None else x_adapter
        with torch.enable_grad():
            leaves, cast = _leaves(factors, dtype)
            b_star, a_star = khatri_rao_chain(_pairs(cast))
        dh = dy2 @ b_star.detach()  # (T, R), without s
        d_adapter_in = (dh @ a_star.detach()).mul_(s)  # (T, n)
        dx = dxa = None
        if x_adapter is None:
            dx = d_adapter_in if weight is None else d_adapter_in.addmm_(dy2, weight.to(dtype))
            dx = dx.view(x.shape)
        else:
            dxa = d_adapter_in.view(x_adapter.shape)
            dx = None if weight is None else (dy2 @ weight.to(dtype)).view(x.shape)
        grads = torch.autograd.grad(
            (b_star, a_star), leaves, (dy2.T @ h * s, dh.T @ xa.reshape(-1, n) * s)
        )  # dL/dB* (m, R), dL/dA* (R, n) pulled back to every factor
        return (dx, dxa, None, None, None, *grads)


class _MergedChain(Function):
    """y = x (W0 + s P)ᵀ + b, P = (B1 A1) ⊙ ... ⊙ (BK AK); x W0ᵀ + b + s x_a Pᵀ with dropout."""

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, scaling, *factors):
        dtype, n = x.dtype, x.shape[-1]
        p = chain_product(_pairs([f.to(dtype) for f in factors]))  # (m, n)
        b = None if bias is None else bias.to(dtype)
        x2 = x.reshape(-1, n)
        if x_adapter is None:
            y = F.linear(x2, torch.add(weight.to(dtype), p, alpha=scaling), b)
        else:
            y = F.linear(x2, weight.to(dtype), b).addmm_(x_adapter.reshape(-1, n), p.T, alpha=scaling)
        ctx.save_for_backward(x, x_adapter, weight, *factors)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], p.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, x_adapter, weight, *factors = ctx.saved_tensors
        s, dtype, n = ctx.scaling, dy.dtype, x.shape[-1]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)  # (T, m)
        with torch.enable_grad():
            leaves, cast = _leaves(factors, dtype)
            p = chain_product(_pairs(cast))  # rebuilt (m, n)
        w0 = weight.to(dtype)
        dx = dxa = None
        if x_adapter is None:
            dx = (dy2 @ torch.add(w0, p.detach(), alpha=s)).view(x.shape)
            src = x.reshape(-1, n)
        else:
            dx = (dy2 @ w0).view(x.shape)
            dxa = (dy2 @ p.detach()).mul_(s).view(x_adapter.shape)
            src = x_adapter.reshape(-1, n)
        grads = torch.autograd.grad(p, leaves, (dy2.T @ src).mul_(s))  # G = s dyᵀx (m, n)
        return (dx, dxa, None, None, None, *grads)


class ABBAChainLinear(AdapterLinear):
    """ABBA with K >= 3 pairs; factors B1, A1, ..., BK, AK (fp32)."""

    kind = "abba"

    def __init__(
        self,
        base: nn.Linear,
        ranks: list[int],
        scaling: float,
        dropout: float = 0.0,
        path: str = "auto",
        name: str = "",
        seed: int = 0,
        init: bool = True,
        init_method: str = "svd",
    ) -> None:
        super().__init__(base, scaling, dropout, name)
        if path not in (*CHAIN_PATHS, "auto"):
            raise ValueError(f"path {path!r}: a chain of pairs runs {', '.join(CHAIN_PATHS)} or auto")
        self.ranks, self.path, self.init_method = list(ranks), path, init_method
        self.factor_names = factor_names(len(ranks))
        m, n, device = self.out_features, self.in_features, self.weight.device
        for i, r in enumerate(ranks, 1):
            setattr(self, f"B{i}", nn.Parameter(torch.zeros(m, r, device=device)))
            setattr(self, f"A{i}", nn.Parameter(torch.zeros(r, n, device=device)))
        if init:
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """abba_init.init_pairs' factors for `init_method`: the last pair's B is 0, so dW = 0."""
        gen = layer_generator(seed, self.name)
        for i, (b, a) in enumerate(init_pairs(self.init_method, self.frozen_weight(), self.ranks, gen), 1):
            getattr(self, f"B{i}").copy_(b)
            getattr(self, f"A{i}").copy_(a)

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"B{i}"), getattr(self, f"A{i}")) for i in range(1, len(self.ranks) + 1)]

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * chain_product([(b.float(), a.float()) for b, a in self._pairs()])

    def resolved_path(self, tokens: int, dropout: bool = False, device_type: str | None = None) -> str:
        """The path a forward over `tokens` tokens runs on `device_type` (default: where the weight is now)."""
        if self.path != "auto":
            return self.path
        costs = cost_constants(device_type or self.weight.device.type)
        return choose_chain_path(self.out_features, self.in_features, self.ranks, tokens, dropout, costs)

    def adapter_forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(dtype)
        x_adapter = self.adapter_input(x)
        dropout = x_adapter is not x
        factors = [t for pair in self._pairs() for t in pair]
        x_adapter = x_adapter if dropout else None
        with torch.autocast(x.device.type, enabled=False):
            if self.quantized_base is not None:  # packed W0: bitsandbytes' matmul, then the adapter's term
                delta = _KhatriRaoChain.apply(x, x_adapter, None, None, self.scaling, *factors)
                return self.base_forward(x, dtype) + delta
            path = self.resolved_path(x.numel() // self.in_features, dropout)
            function = _KhatriRaoChain if path == "khatri_rao" else _MergedChain
            return function.apply(x, x_adapter, self.weight, self.bias, self.scaling, *factors)
