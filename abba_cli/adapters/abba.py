"""ABBA: dW = s * (B1 @ A1) ⊙ (B2 @ A2)   (arXiv 2505.14238, eq. 7).

B1 (m, r1), A1 (r1, n), B2 (m, r2), A2 (r2, n); effective rank up to r1*r2 with (r1+r2)(m+n) parameters.
Two exact execution paths, both custom autograd functions that keep neither an (m, n) tensor nor the r1*r2-wide
factors alive between forward and backward (they are rebuilt in backward):

- Khatri-Rao: (B1A1) ⊙ (B2A2) = B* A* with B* = B1 ⊙r B2 (m, r1r2) and A* = (A1ᵀ ⊙r A2ᵀ)ᵀ (r1r2, n), so
  dW x = B* (A* x) without an (m, n) matrix. Extra cost ≈ 3·r1r2·(m+n)·T multiply-adds.
- merged: build W0 + dW inside the function and run one matmul; backward rebuilds it for dx and forms
  G = dyᵀx (m·n·T) for the factor gradients. Extra cost ≈ m·n·T + 4·m·n·(r1+r2).

`auto` picks the cheaper one per layer and per call (T is known at forward time) from that cost model;
`benchmarks/` calibrates its constants (KR_COST, MERGED_COST) by measurement.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from abba_cli.adapters.base import AdapterLinear, kaiming_uniform, layer_generator

# Cost model of `auto`, in units of one merged-path multiply-add (calibrated by measurement, not guessed:
# `benchmarks/layer_sweep.py --fit` fits these to the measured cells, minimising auto's worst regret; the values and
# the machine they come from are in benchmarks/RESULTS.md "## Performance").
# - KR_COST: one Khatri-Rao multiply-add. Its matmuls are skinny (inner or outer size r1*r2), so each does less
#   work per byte moved than the merged path's big square-ish ones.
# - KR_ELEMENT_COST: per activation element T*(m+n) the Khatri-Rao path streams through memory (reading x and dy,
#   writing the extra (T, m) output and (T, n) input gradient and adding them to the base's), a cost that does not
#   shrink with r1*r2: at small ranks it, not the multiply-adds, decides.
# Fitted on the quick sweep (2-core AMD EPYC, fp32, 1 torch thread), two runs, same result both times:
KR_COST = 0.79
KR_ELEMENT_COST = 0.0
MERGED_COST = 1.0


def abba_scaling(alpha: float, r1: int, r2: int, convention: str) -> float:
    """Paper eq. 7: s = alpha² / sqrt(r1 r2). Released code: s = sqrt(alpha) * sqrt(alpha) = alpha."""
    if convention == "paper":
        return alpha**2 / math.sqrt(r1 * r2)
    if convention == "released":
        return float(alpha)
    raise ValueError(f"unknown ABBA scaling convention {convention!r}")


def choose_path(m: int, n: int, r1: int, r2: int, tokens: int) -> str:
    """The cheaper exact path for one layer and micro-batch, by weighted multiply-add count (module docstring)."""
    kr = (
        KR_COST * (3 * r1 * r2 * (m + n) * tokens + 2 * r1 * r2 * (m + n))
        + KR_ELEMENT_COST * (m + n) * tokens
    )
    merged = MERGED_COST * (m * n * tokens + 4 * m * n * (r1 + r2))
    return "khatri_rao" if kr <= merged else "merged"


def _khatri_rao_factors(B1, A1, B2, A2, dtype, scale: float = 1.0):
    """B* (m, r1 r2) and A* (r1 r2, n), column/row (i, j) at index i*r2 + j; `scale` folded into B* via B1.

    Both are built r-major ((m, r1, r2) and (r1, r2, n) contiguous), so the reshapes are free views and the
    matmuls read them without a transpose copy. `.to(dtype)` is a no-op when the factors are already `dtype`.
    """
    m, r1 = B1.shape
    r2, n = A2.shape
    b1 = B1.to(dtype)
    if scale != 1.0:
        b1 = b1 * scale  # (m, r1): scaling here is cheaper than scaling a (T, m) or (T, r1r2) activation
    b_kr = (b1[:, :, None] * B2.to(dtype)[:, None, :]).reshape(m, r1 * r2)  # (m, r1r2)
    a_kr = (A1.to(dtype)[:, None, :] * A2.to(dtype)[None, :, :]).reshape(r1 * r2, n)  # (r1r2, n)
    return b_kr, a_kr


class _KhatriRaoDelta(Function):
    """y = s · B* (A* x): the adapter's output only (the frozen base matmul runs outside, under autograd)."""

    @staticmethod
    def forward(ctx, x, scaling, B1, A1, B2, A2):
        dtype = x.dtype
        b_kr, a_kr = _khatri_rao_factors(B1, A1, B2, A2, dtype, scaling)
        x2 = x.reshape(-1, x.shape[-1])  # (T, n)
        h = x2 @ a_kr.T  # (T, r1r2): an activation, saved like LoRA's (T, r)
        y = h @ b_kr.T  # (T, m), s already in b_kr
        ctx.save_for_backward(x, h, B1, A1, B2, A2)
        ctx.scaling = scaling
        return y.reshape(*x.shape[:-1], b_kr.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, h, B1, A1, B2, A2 = ctx.saved_tensors
        s = ctx.scaling
        dtype = x.dtype
        m, r1 = B1.shape
        r2, n = A2.shape
        b_kr, a_kr = _khatri_rao_factors(B1, A1, B2, A2, dtype, s)  # rebuilt, not saved; s inside b_kr
        dy2 = dy.reshape(-1, m).to(dtype)  # (T, m)
        x2 = x.reshape(-1, n)
        dh = dy2 @ b_kr  # (T, r1r2) = s · dy B*
        dx = (dh @ a_kr).reshape(x.shape) if ctx.needs_input_grad[0] else None  # (T, n)
        db_kr = (dy2.T @ h).view(m, r1, r2)  # dL/dB* / s
        da_kr = (dh.T @ x2).view(r1, r2, n)  # dL/dA*
        # B*[k, i r2 + j] = B1[k, i] B2[k, j]  and  A*[i r2 + j, c] = A1[i, c] A2[j, c]; the B sums are batched
        # mat-vecs (no (m, r1, r2) temporary), s is applied to the (m, r) results.
        b1, b2 = B1.to(dtype), B2.to(dtype)
        dB1 = torch.bmm(db_kr, b2[:, :, None]).squeeze(2).mul_(s)  # (m, r1)
        dB2 = torch.bmm(b1[:, None, :], db_kr).squeeze(1).mul_(s)  # (m, r2)
        dA1 = (da_kr * A2.to(dtype)[None, :, :]).sum(1)  # (r1, n)
        dA2 = (da_kr * A1.to(dtype)[:, None, :]).sum(0)  # (r2, n)
        return dx, None, dB1.to(B1.dtype), dA1.to(A1.dtype), dB2.to(B2.dtype), dA2.to(A2.dtype)


def _merged_weight(weight, B1, A1, B2, A2, scaling, dtype):
    """(W0 + s (B1 A1) ⊙ (B2 A2), B1 A1, B2 A2) in `dtype`; the sum in one fused pass (addcmul)."""
    p1 = B1.to(dtype) @ A1.to(dtype)  # (m, n)
    p2 = B2.to(dtype) @ A2.to(dtype)  # (m, n)
    return torch.addcmul(weight.to(dtype), p1, p2, value=scaling), p1, p2


class _MergedABBA(Function):
    """y = x (W0 + dW)ᵀ + b in one matmul, or x W0ᵀ + b + x_a dWᵀ when dropout makes the adapter input differ.

    Saves only x (and x_a) and the factors; W0 + dW and dW are rebuilt in backward.
    """

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, scaling, B1, A1, B2, A2):
        dtype = x.dtype
        b = None if bias is None else bias.to(dtype)
        if x_adapter is None:
            w, p1, p2 = _merged_weight(weight, B1, A1, B2, A2, scaling, dtype)
            del p1, p2
            y = F.linear(x, w, b)  # the frozen layer's own cost: the update rides along for free
        else:
            p1 = B1.to(dtype) @ A1.to(dtype)
            delta = p1.mul_(B2.to(dtype) @ A2.to(dtype)).mul_(scaling)  # (m, n), freed on return
            y = F.linear(x, weight.to(dtype), b) + F.linear(x_adapter, delta)
        ctx.save_for_backward(x, x_adapter, weight, bias, B1, A1, B2, A2)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, x_adapter, weight, bias, B1, A1, B2, A2 = ctx.saved_tensors
        s = ctx.scaling
        dtype = x.dtype
        m, n = weight.shape
        need_x, need_xa, need_w, need_b = ctx.needs_input_grad[:4]
        dy2 = dy.reshape(-1, m).to(dtype)  # (T, m)
        dx = dxa = dw = db = None
        if x_adapter is None:
            w, p1, p2 = _merged_weight(weight, B1, A1, B2, A2, s, dtype)  # rebuilt (m, n) each
            if need_x:  # skipped when x needs no gradient (e.g. the first layer's inputs)
                dx = (dy2 @ w).reshape(x.shape)
            del w
            src = x.reshape(-1, n)
        else:
            p1 = B1.to(dtype) @ A1.to(dtype)
            p2 = B2.to(dtype) @ A2.to(dtype)
            if need_x:
                dx = (dy2 @ weight.to(dtype)).reshape(x.shape)
            if need_xa:
                dxa = (dy2 @ (p1 * p2).mul_(s)).reshape(x_adapter.shape)
            src = x_adapter.reshape(-1, n)
        grad = dy2.T @ src  # dL/dW' / s, (m, n); s is applied to the small (m, r) and (r, n) results
        if need_w:
            dw = (dy2.T @ x.reshape(-1, n)).to(weight.dtype)
        if need_b and bias is not None:
            db = dy2.sum(0).to(bias.dtype)
        g1 = p2.mul_(grad)  # dL/d(B1 A1) / s, in p2's buffer (p2 is not needed any more)
        dB1 = (g1 @ A1.to(dtype).T).mul_(s).to(B1.dtype)
        dA1 = (B1.to(dtype).T @ g1).mul_(s).to(A1.dtype)
        del g1, p2
        g2 = grad.mul_(p1)  # dL/d(B2 A2) / s
        dB2 = (g2 @ A2.to(dtype).T).mul_(s).to(B2.dtype)
        dA2 = (B2.to(dtype).T @ g2).mul_(s).to(A2.dtype)
        return dx, dxa, dw, db, None, dB1, dA1, dB2, dA2


class ABBALinear(AdapterLinear):
    factor_names = ("B1", "A1", "B2", "A2")
    kind = "abba"

    def __init__(
        self,
        base: nn.Linear,
        r1: int,
        r2: int,
        scaling: float,
        dropout: float = 0.0,
        path: str = "auto",
        name: str = "",
        seed: int = 0,
        init: bool = True,
    ) -> None:
        super().__init__(base, scaling, dropout, name)
        m, n = self.out_features, self.in_features
        self.r1, self.r2, self.path = r1, r2, path
        device = self.weight.device
        self.B1 = nn.Parameter(torch.zeros(m, r1, device=device))
        self.A1 = nn.Parameter(torch.zeros(r1, n, device=device))
        self.B2 = nn.Parameter(torch.zeros(m, r2, device=device))
        self.A2 = nn.Parameter(torch.zeros(r2, n, device=device))
        if init:
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """B1, A1 = U Σ^½, Σ^½ Vᵀ of W0's top r1 (fp32); B2 = 0; A2 Kaiming-uniform: dW = 0, all grads non-zero.

        Zero-initialising both B's would kill every gradient (paper appendix C).
        """
        gen = layer_generator(seed, self.name)
        w = self.weight.detach().float()
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            # svd_lowrank draws its random projection from the global RNG: seed it per layer so every process
            # (and every rerun) gets the same factors.
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            u, sigma, v = torch.svd_lowrank(w, q=min(self.r1 + 10, min(w.shape)), niter=4)
        root = sigma[: self.r1].sqrt()
        self.B1.copy_(u[:, : self.r1] * root)  # (m, r1)
        self.A1.copy_(root[:, None] * v[:, : self.r1].T)  # (r1, n)
        self.B2.zero_()
        self.A2.copy_(kaiming_uniform((self.r2, self.in_features), gen).to(self.A2.device))

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.B1.float() @ self.A1.float()) * (self.B2.float() @ self.A2.float())

    def resolved_path(self, tokens: int) -> str:
        if self.path != "auto":
            return self.path
        return choose_path(self.out_features, self.in_features, self.r1, self.r2, tokens)

    def adapter_forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(dtype)
        x_adapter = self.adapter_input(x)
        with torch.autocast(x.device.type, enabled=False):
            if self.resolved_path(x.numel() // self.in_features) == "khatri_rao":
                return self.base_forward(x, dtype) + _KhatriRaoDelta.apply(
                    x_adapter, self.scaling, self.B1, self.A1, self.B2, self.A2
                )
            return _MergedABBA.apply(
                x,
                None if x_adapter is x else x_adapter,
                self.weight,
                self.bias,
                self.scaling,
                self.B1,
                self.A1,
                self.B2,
                self.A2,
            )
