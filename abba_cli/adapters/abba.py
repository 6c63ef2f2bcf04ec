"""ABBA: dW = s * (B1 @ A1) ⊙ (B2 @ A2)   (arXiv 2505.14238, eq. 7).

B1 (m, r1), A1 (r1, n), B2 (m, r2), A2 (r2, n); effective rank up to r1*r2 with (r1+r2)(m+n) parameters.
Three exact execution paths, all custom autograd functions that keep neither an (m, n) tensor nor the r1*r2-wide
factors alive between forward and backward (they are rebuilt in backward):

- khatri_rao: (B1A1) ⊙ (B2A2) = B* A* with B* = B1 ⊙r B2 (m, r1r2) and A* = (A1ᵀ ⊙r A2ᵀ)ᵀ (r1r2, n), so
  dW x = B* (A* x) without an (m, n) matrix: a rank-r1r2 LoRA. Extra cost ≈ 3·r1r2·(m+n)·T multiply-adds.
- merged: build W0 + dW inside the function and run one matmul; backward rebuilds it for dx and forms
  G = dyᵀx (m·n·T) for the factor gradients. Extra cost ≈ m·n·T + 4·m·n·(r1+r2).
- hybrid: the merged forward and dx (free: they ride on the frozen layer's own matmuls), with the factor
  gradients taken the Khatri-Rao way (dyᵀ(x A*ᵀ) and (dy B*)ᵀx) instead of through G. It drops two of the
  Khatri-Rao path's six skinny matmuls: extra cost ≈ 2·r1r2·(m+n)·T + 2·m·n·(r1+r2). It wins on wide layers
  with many tokens (Llama/Mistral shapes at r1r2 up to a few hundred).

With adapter dropout the adapter sees a different input than the frozen layer, so W0 + dW cannot be applied in
one matmul: the merged path then pays three extra m·n·T matmuls and the hybrid path does not exist (it would be
the Khatri-Rao path). `auto` picks the cheapest path per layer and per call (T is known at forward time) from
that cost model (cost.py: constants per device type, and a price per kernel launch, which decides on a GPU at
the shipped 512 tokens); `benchmarks/layer_sweep.py --fit` calibrates its constants by measurement.

Launches are kept few (benchmarks/op_count.py; tests/benchmarks/test_bench_op_count.py holds every path within
1.25x our LoRA's): the factors are cast once per call as one packed copy that backward reuses, B1A1 and B2A2 come
from one batched matmul when r1 == r2, s rides in addmm's alpha or in the one op that casts the gradients back.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from abba_cli.adapters.abba_init import init_pairs
from abba_cli.adapters.base import AdapterLinear, layer_generator
from abba_cli.adapters.cost import PATHS, choose_path, cost_constants, path_costs  # noqa: F401 (re-exported)


def abba_scaling(alpha: float, r1: int, r2: int, convention: str) -> float:
    """Paper eq. 7: s = alpha² / sqrt(r1 r2). Released code: s = sqrt(alpha) * sqrt(alpha) = alpha."""
    if convention == "paper":
        return alpha**2 / math.sqrt(r1 * r2)
    if convention == "released":
        return float(alpha)
    raise ValueError(f"unknown ABBA scaling convention {convention!r}")


def khatri_rao_factors(
    B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (B*, A*) of rank r1*r2 with B* @ A* == (B1 @ A1) * (B2 @ A2) exactly in exact arithmetic.

    B*[i, j*r2 + k] = B1[i, j] * B2[i, k] and A*[j*r2 + k, c] = A1[j, c] * A2[k, c], so
    (B* A*)[i, c] = sum_jk B1[i,j] A1[j,c] B2[i,k] A2[k,c] = (B1 A1)[i,c] (B2 A2)[i,c].
    """
    return khatri_rao_b(B1, B2), khatri_rao_a(A1, A2)


def khatri_rao_b(B1: torch.Tensor, B2: torch.Tensor) -> torch.Tensor:
    """B* (m, r1 r2) in one kernel, built r-major ((m, r1, r2) contiguous): the reshape is a free view and
    matmuls read it without a transpose copy."""
    m, r1 = B1.shape
    return (B1[:, :, None] * B2[:, None, :]).reshape(m, r1 * B2.shape[1])


def khatri_rao_a(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """A* (r1 r2, n), built r-major ((r1, r2, n) contiguous), like `khatri_rao_b`."""
    r1, n = A1.shape
    return (A1[:, None, :] * A2[None, :, :]).reshape(r1 * A2.shape[0], n)


# -- the factors in the compute dtype, cast once per layer call ---------------------------------------------------
# Under autocast the factors are fp32 and the matmuls bf16. Casting each factor where it is used cost 8 casts per
# layer and step, and 4 more for the gradients: on a GPU at 512 tokens each is a launch about as dear as a matmul.
# Instead one `cat` packs all four (fp32, one kernel) and one cast converts the pack; forward saves it (the bf16
# copies LoRA's autograd saves too) and backward writes the four gradients into one buffer that a single `mul`
# scales by s and casts back. (`cat(out=<bf16 buffer>)` would look like one op, but CUDA's cat runs one copy
# kernel per input when the dtypes differ.)


class _Cast(NamedTuple):
    """Views of a packed buffer: the factors, and (r1 == r2) the stacks [B1, B2], [B2, B1], [A1, A2], [A2, A1]."""

    b1: torch.Tensor
    a1: torch.Tensor
    b2: torch.Tensor
    a2: torch.Tensor
    b12: torch.Tensor | None
    b21: torch.Tensor | None
    a12: torch.Tensor | None
    a21: torch.Tensor | None


def _pack(B1, A1, B2, A2, dtype: torch.dtype, stacked: bool) -> torch.Tensor:
    """[B1, B2, A1, A2] flattened in `dtype` (two kernels: the cat, and the cast unless `dtype` is the factors').
    `stacked` (r1 == r2 only) repeats B1 and A1 after B2 and A2, so that both orders of the pairs are (2, m, r) /
    (2, r, n) views for batched matmuls."""
    parts = [B1, B2, B1, A1, A2, A1] if stacked else [B1, B2, A1, A2]
    return torch.cat([p.reshape(-1) for p in parts]).to(dtype)


def _views(buf: torch.Tensor, m: int, n: int, r1: int, r2: int, stacked: bool) -> _Cast:
    mb = m * r1
    if not stacked:
        b1, b2 = buf[:mb].view(m, r1), buf[mb : mb + m * r2].view(m, r2)
        a = buf[mb + m * r2 :]
        return _Cast(b1, a[: r1 * n].view(r1, n), b2, a[r1 * n :].view(r2, n), None, None, None, None)
    na = r1 * n
    bs, as_ = buf[: 3 * mb], buf[3 * mb :]
    b12, b21 = bs[: 2 * mb].view(2, m, r1), bs[mb:].view(2, m, r1)
    a12, a21 = as_[: 2 * na].view(2, r1, n), as_[na:].view(2, r1, n)
    return _Cast(b12[0], a12[0], b12[1], a12[1], b12, b21, a12, a21)


def _grad_buffer(f: _Cast) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """An empty buffer for dB1, dB2, dA1, dA2 (that order), and views of it shaped like each."""
    shapes = (f.b1.shape, f.b2.shape, f.a1.shape, f.a2.shape)
    sizes = [s[0] * s[1] for s in shapes]
    buf = f.b1.new_empty(sum(sizes))
    return buf, tuple(v.view(s) for v, s in zip(buf.split(sizes), shapes, strict=True))


def _factor_grads(buf: torch.Tensor, s: float, dtype: torch.dtype, f: _Cast):
    """(dB1, dA1, dB2, dA2) in the factors' `dtype` from the unscaled gradient buffer: one kernel scales and
    casts (a `mul` writing into a buffer of the other dtype)."""
    out = buf.mul_(s) if buf.dtype == dtype else torch.mul(buf, s, out=torch.empty_like(buf, dtype=dtype))
    sizes = [f.b1.numel(), f.b2.numel(), f.a1.numel(), f.a2.numel()]
    dB1, dB2, dA1, dA2 = (
        v.view(t.shape) for v, t in zip(out.split(sizes), (f.b1, f.b2, f.a1, f.a2), strict=True)
    )
    return dB1, dA1, dB2, dA2


def _products(f: _Cast) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(P, B1 A1, B2 A2), each (m, n): one batched matmul P = [B2 A2, B1 A1] when r1 == r2, else two."""
    if f.b21 is None:
        return None, f.b1 @ f.a1, f.b2 @ f.a2
    p = torch.bmm(f.b21, f.a21)  # (2, m, n)
    return p, p[1], p[0]


def _khatri_rao_factor_grads(dy2, x2, h, dh, f: _Cast, s: float, dtype: torch.dtype):
    """dB1, dA1, dB2, dA2 from dL/dB* = s·dyᵀh and dL/dA* = s·dhᵀx (h = x A*ᵀ, dh = dy B*).

    B*[k, i r2 + j] = B1[k, i] B2[k, j] and A*[i r2 + j, c] = A1[i, c] A2[j, c]: the B sums are batched mat-vecs
    (no (m, r1, r2) temporary). Each result is written into one buffer, which is scaled by s and cast once.
    """
    m, r1 = f.b1.shape
    r2, n = f.a2.shape
    buf, (gb1, gb2, ga1, ga2) = _grad_buffer(f)
    db_kr = (dy2.T @ h).view(m, r1, r2)  # dL/dB* / s
    da_kr = (dh.T @ x2).view(r1, r2, n)  # dL/dA* / s
    torch.bmm(db_kr, f.b2[:, :, None], out=gb1[:, :, None])  # (m, r1, 1)
    torch.bmm(f.b1[:, None, :], db_kr, out=gb2[:, None, :])  # (m, 1, r2)
    torch.sum(da_kr * f.a2[None, :, :], 1, out=ga1)  # (r1, n)
    torch.sum(da_kr * f.a1[:, None, :], 0, out=ga2)  # (r2, n)
    return _factor_grads(buf, s, dtype, f)


def _base_grads(ctx, dy2, x, weight, bias):
    """dW0 and db, should a caller ever unfreeze the frozen weight or bias (None otherwise)."""
    need_w, need_b = ctx.needs_input_grad[2:4]
    dw = (dy2.T @ x.reshape(-1, weight.shape[1])).to(weight.dtype) if need_w else None
    db = dy2.sum(0).to(bias.dtype) if need_b and bias is not None else None
    return dw, db


class _KhatriRaoABBA(Function):
    """y = x W0ᵀ + b + s · (x_a A*ᵀ) B*ᵀ: the frozen matmul and a rank-r1r2 LoRA, s riding in addmm's alpha.

    x_adapter: the dropped-out input, or None when it is x. Saves x (and x_a), h = x_a A*ᵀ (T, r1r2: an
    activation, like LoRA's (T, r)) and the packed factors; B* and A* are rebuilt in backward. `weight` None: the
    adapter's term only (a quantized base runs its frozen matmul through bitsandbytes, outside this function).
    """

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, scaling, B1, A1, B2, A2):
        dtype = x.dtype
        m, n = B1.shape[0], A1.shape[1]
        r1, r2 = B1.shape[1], B2.shape[1]
        buf = _pack(B1, A1, B2, A2, dtype, False)
        f = _views(buf, m, n, r1, r2, False)
        xa = x if x_adapter is None else x_adapter
        h = xa.reshape(-1, n) @ khatri_rao_a(f.a1, f.a2).T  # (T, r1r2)
        if weight is None:
            y = (h @ khatri_rao_b(f.b1, f.b2).T).mul_(scaling)  # (T, m)
        else:
            y = F.linear(
                x.reshape(-1, n), weight.to(dtype), None if bias is None else bias.to(dtype)
            )  # (T, m)
            # in place: CUDA's out-of-place addmm copies its input into the result first (a second launch)
            y.addmm_(h, khatri_rao_b(f.b1, f.b2).T, alpha=scaling)
        ctx.save_for_backward(x, x_adapter, h, weight, bias, buf)
        ctx.scaling, ctx.ranks, ctx.factor_dtype = scaling, (r1, r2), B1.dtype
        return y.view(*x.shape[:-1], m)

    @staticmethod
    def backward(ctx, dy):
        x, x_adapter, h, weight, bias, buf = ctx.saved_tensors
        s, dtype = ctx.scaling, buf.dtype
        m, n = dy.shape[-1], x.shape[-1]
        f = _views(buf, m, n, *ctx.ranks, False)
        dy2 = dy.reshape(-1, m).to(dtype)  # (T, m)
        a_kr = khatri_rao_a(f.a1, f.a2)
        dh = dy2 @ khatri_rao_b(f.b1, f.b2)  # (T, r1r2) = dy B*, without s
        dx = dxa = None
        if weight is None:  # the adapter's term only: its input gradient, wherever the input came from
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                d_in = (dh @ a_kr).mul_(s)
                if x_adapter is None:
                    dx = d_in.view(x.shape)
                else:
                    dxa = d_in.view(x_adapter.shape)
        elif x_adapter is None:
            if ctx.needs_input_grad[0]:
                dx = (dy2 @ weight.to(dtype)).addmm_(dh, a_kr, alpha=s).view(x.shape)
        else:
            if ctx.needs_input_grad[0]:
                dx = (dy2 @ weight.to(dtype)).view(x.shape)
            if ctx.needs_input_grad[1]:
                dxa = (dh @ a_kr).mul_(s).view(x_adapter.shape)
        xa = x if x_adapter is None else x_adapter
        grads = _khatri_rao_factor_grads(dy2, xa.reshape(-1, n), h, dh, f, s, ctx.factor_dtype)
        base_grads = (None, None) if weight is None else _base_grads(ctx, dy2, x, weight, bias)
        return (dx, dxa, *base_grads, None, *grads)


class _MergedABBA(Function):
    """y = x (W0 + dW)ᵀ + b in one matmul, or x W0ᵀ + b + s·x_a (P1⊙P2)ᵀ when dropout makes the adapter input
    differ (x_adapter not None). Saves x (and x_a) and the packed factors; P1, P2, W0 + dW are rebuilt in backward.
    """

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, scaling, B1, A1, B2, A2):
        dtype = x.dtype
        m, n = weight.shape
        r1, r2 = B1.shape[1], B2.shape[1]
        buf = _pack(B1, A1, B2, A2, dtype, r1 == r2)
        _, p1, p2 = _products(_views(buf, m, n, r1, r2, r1 == r2))
        b = None if bias is None else bias.to(dtype)
        x2 = x.reshape(-1, n)
        if x_adapter is None:
            y = F.linear(x2, torch.addcmul(weight.to(dtype), p1, p2, value=scaling), b)
        else:
            y = F.linear(x2, weight.to(dtype), b).addmm_(
                x_adapter.reshape(-1, n), p1.mul_(p2).T, alpha=scaling
            )
        ctx.save_for_backward(x, x_adapter, weight, bias, buf)
        ctx.scaling, ctx.ranks, ctx.factor_dtype = scaling, (r1, r2), B1.dtype
        return y.view(*x.shape[:-1], m)

    @staticmethod
    def backward(ctx, dy):
        x, x_adapter, weight, bias, buf = ctx.saved_tensors
        s, dtype = ctx.scaling, buf.dtype
        m, n = weight.shape
        r1, r2 = ctx.ranks
        f = _views(buf, m, n, r1, r2, r1 == r2)
        dy2 = dy.reshape(-1, m).to(dtype)  # (T, m)
        w0 = weight.to(dtype)
        dx = dxa = None
        p, p1, p2 = _products(f)  # rebuilt (m, n) each
        if x_adapter is None:
            if ctx.needs_input_grad[
                0
            ]:  # skipped (W0 + dW not built) when x needs no gradient (the first layer)
                dx = (dy2 @ torch.addcmul(w0, p1, p2, value=s)).view(x.shape)
            src = x.reshape(-1, n)
        else:
            if ctx.needs_input_grad[0]:
                dx = (dy2 @ w0).view(x.shape)
            if ctx.needs_input_grad[1]:
                dxa = (dy2 @ (p1 * p2)).mul_(s).view(x_adapter.shape)
            src = x_adapter.reshape(-1, n)
        grad = dy2.T @ src  # dL/dW' / s, (m, n)
        gbuf, (gb1, gb2, ga1, ga2) = _grad_buffer(f)
        if p is not None:  # p = [P2, P1] -> [G⊙P2, G⊙P1] = [dL/dP1, dL/dP2] / s, in p's buffer
            g = p.mul_(grad)
            torch.bmm(g, f.a12.mT, out=gbuf[: gb1.numel() + gb2.numel()].view(2, m, r1))  # [g1 A1ᵀ, g2 A2ᵀ]
            torch.bmm(f.b12.mT, g, out=gbuf[gb1.numel() + gb2.numel() :].view(2, r1, n))  # [B1ᵀ g1, B2ᵀ g2]
        else:
            g1, g2 = p2.mul_(grad), p1.mul_(grad)  # in P2's and P1's buffers (not needed any more)
            torch.mm(g1, f.a1.T, out=gb1)
            torch.mm(f.b1.T, g1, out=ga1)
            torch.mm(g2, f.a2.T, out=gb2)
            torch.mm(f.b2.T, g2, out=ga2)
        grads = _factor_grads(gbuf, s, ctx.factor_dtype, f)
        base_grads = (None, None) if weight is None else _base_grads(ctx, dy2, x, weight, bias)
        return (dx, dxa, *base_grads, None, *grads)


class _HybridABBA(Function):
    """y = x (W0 + dW)ᵀ + b in one matmul, dx through W0 + dW; factor gradients the Khatri-Rao way (no G = dyᵀx).

    Saves x, h = x A*ᵀ (T, r1r2; what the Khatri-Rao path saves too) and the packed factors; W0 + dW and B* are
    rebuilt in backward. Only for the no-dropout case (x is the adapter's input too).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scaling, B1, A1, B2, A2):
        dtype = x.dtype
        m, n = weight.shape
        r1, r2 = B1.shape[1], B2.shape[1]
        buf = _pack(B1, A1, B2, A2, dtype, r1 == r2)
        f = _views(buf, m, n, r1, r2, r1 == r2)
        _, p1, p2 = _products(f)
        x2 = x.reshape(-1, n)
        w = torch.addcmul(weight.to(dtype), p1, p2, value=scaling)
        y = F.linear(x2, w, None if bias is None else bias.to(dtype))
        h = x2 @ khatri_rao_a(f.a1, f.a2).T  # (T, r1r2); B* is not needed until backward
        ctx.save_for_backward(x, h, weight, bias, buf)
        ctx.scaling, ctx.ranks, ctx.factor_dtype = scaling, (r1, r2), B1.dtype
        return y.view(*x.shape[:-1], m)

    @staticmethod
    def backward(ctx, dy):
        x, h, weight, bias, buf = ctx.saved_tensors
        s, dtype = ctx.scaling, buf.dtype
        m, n = weight.shape
        r1, r2 = ctx.ranks
        f = _views(buf, m, n, r1, r2, r1 == r2)
        dy2 = dy.reshape(-1, m).to(dtype)  # (T, m)
        dx = None
        if ctx.needs_input_grad[0]:
            _, p1, p2 = _products(f)
            dx = (dy2 @ torch.addcmul(weight.to(dtype), p1, p2, value=s)).view(x.shape)
        dh = dy2 @ khatri_rao_b(f.b1, f.b2)  # (T, r1r2) = dy B*, without s; A* not needed
        x2 = x.reshape(-1, n)
        grads = _khatri_rao_factor_grads(dy2, x2, h, dh, f, s, ctx.factor_dtype)
        # needs_input_grad of (x, weight, bias) sits at 0..2 here: shift by one for _base_grads' indices
        dw = (dy2.T @ x2).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0).to(bias.dtype) if ctx.needs_input_grad[2] and bias is not None else None
        return (dx, dw, db, None, *grads)


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
        init_method: str = "svd",
    ) -> None:
        super().__init__(base, scaling, dropout, name)
        m, n = self.out_features, self.in_features
        self.r1, self.r2, self.path, self.init_method = r1, r2, path, init_method
        device = self.weight.device
        self.B1 = nn.Parameter(torch.zeros(m, r1, device=device))
        self.A1 = nn.Parameter(torch.zeros(r1, n, device=device))
        self.B2 = nn.Parameter(torch.zeros(m, r2, device=device))
        self.A2 = nn.Parameter(torch.zeros(r2, n, device=device))
        if init:
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """The factors of `init_method` (abba_init.py; default: B1 A1 = W0's top-r1 SVD, B2 = 0, A2 Kaiming):
        dW = 0, and every factor gets a gradient from the second step on. On a quantized base W0 is the
        dequantized weight (frozen_weight), as QPiSSA reads it."""
        gen = layer_generator(seed, self.name)
        pairs = init_pairs(self.init_method, self.frozen_weight(), [self.r1, self.r2], gen)
        for (b, a), (b_name, a_name) in zip(pairs, (("B1", "A1"), ("B2", "A2")), strict=True):
            getattr(self, b_name).copy_(b)
            getattr(self, a_name).copy_(a)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.B1.float() @ self.A1.float()) * (self.B2.float() @ self.A2.float())

    def resolved_path(self, tokens: int, dropout: bool = False, device_type: str | None = None) -> str:
        """The path a forward over `tokens` tokens runs on `device_type` (default: where the weight is now). With
        dropout active there is no hybrid path: a forced `hybrid` then runs as `khatri_rao`, its gradient half
        (training with dropout stays exact, just not fused)."""
        if self.path == "auto":
            # The constants of the device type (a dict lookup: torch.compile traces it).
            costs = cost_constants(device_type or self.weight.device.type)
            return choose_path(self.out_features, self.in_features, self.r1, self.r2, tokens, dropout, costs)
        if self.path == "hybrid" and dropout:
            return "khatri_rao"
        return self.path

    def adapter_forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(dtype)
        x_adapter = self.adapter_input(x)
        dropout = x_adapter is not x
        factors = (self.B1, self.A1, self.B2, self.A2)
        with torch.autocast(x.device.type, enabled=False):
            path = self.resolved_path(x.numel() // self.in_features, dropout)
            x_adapter = x_adapter if dropout else None
            if self.quantized_base is not None:  # packed W0: bitsandbytes' matmul, then the adapter's term
                delta = _KhatriRaoABBA.apply(x, x_adapter, None, None, self.scaling, *factors)
                return self.base_forward(x, dtype) + delta
            if path == "khatri_rao":
                return _KhatriRaoABBA.apply(x, x_adapter, self.weight, self.bias, self.scaling, *factors)
            if path == "hybrid" and torch.is_grad_enabled():
                return _HybridABBA.apply(x, self.weight, self.bias, self.scaling, *factors)
            # (hybrid without gradients: its forward is the merged one, minus the h it would save)
            return _MergedABBA.apply(x, x_adapter, self.weight, self.bias, self.scaling, *factors)


def describe_paths(model: nn.Module, tokens: int, device_type: str | None = None) -> str | None:
    """One line saying which exact path each ABBA layer runs for a micro-batch of `tokens` tokens on `device_type`
    (default: where each layer's weight is now); None when the model has no ABBA layer.

    Adapter dropout counts as it will in training (it is what decides whether the fused paths exist).
    """
    by_path: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if getattr(module, "kind", None) == "abba" and isinstance(
            module, AdapterLinear
        ):  # two pairs or a chain
            dropout = isinstance(module.dropout, nn.Dropout) and module.dropout.p > 0
            by_path.setdefault(module.resolved_path(tokens, dropout, device_type), []).append(name)
    if not by_path:
        return None
    parts = []
    for path, names in sorted(by_path.items()):
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        parts.append(f"{path} on {len(names)} ({', '.join(kinds)})")
    return f"ABBA execution at {tokens} tokens per micro-batch: " + "; ".join(parts)
