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
that cost model; `benchmarks/layer_sweep.py --fit` calibrates its constants by measurement.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from abba_cli.adapters.base import AdapterLinear, kaiming_uniform, layer_generator

# Cost model of `auto`, in units of one multiply-add of a big (m, n, T) matmul (calibrated by measurement, not
# guessed: `benchmarks/layer_sweep.py --fit` fits these to the measured cells, minimising auto's worst regret; the
# values and the machine they come from are in benchmarks/RESULTS.md "## Performance").
# - KR_COST: one multiply-add of the Khatri-Rao path's matmuls. They are skinny (inner or outer size r1*r2), so
#   each does less work per byte moved than the big square-ish ones.
# - HYBRID_COST: the same for the hybrid path's four gradient matmuls (other shapes: (T, m) x (m, r1r2) and two
#   with the token dimension inside).
# - KR_ELEMENT_COST: per activation element T*(m+n) that a pair of skinny matmuls streams through memory (reading
#   x or dy, writing a (T, m) or (T, n) result); at small r1*r2 this, not the multiply-adds, decides their cost.
# - BUILD_COST: one multiply-add of building B1A1 and B2A2 (inner size r1 or r2, an (m, n) output) or of the
#   merged path's small gradient matmuls that read an (m, n) matrix.
# - ELEMENT_COST: per (m, n) element of one such build: the element-wise passes (W0 + s·P1⊙P2, G⊙P2) and the
#   (m, n) writes are memory-bound, so at small ranks they, not the multiply-adds, decide what a build costs.
# Fitted on the full layer sweep with and without dropout, 94 cells (2-core AMD EPYC, fp32, 1 torch thread):
# auto within 0.7% of the fastest path in every cell. Other hardware (a GPU above all) has other constants:
# re-run the sweep with --fit there.
KR_COST = 0.708
HYBRID_COST = 0.92
BUILD_COST = 0.501
ELEMENT_COST = 45.3
KR_ELEMENT_COST = 16.0
COST_CONSTANTS = ("KR_COST", "HYBRID_COST", "BUILD_COST", "ELEMENT_COST", "KR_ELEMENT_COST")

PATHS = ("khatri_rao", "merged", "hybrid")


def abba_scaling(alpha: float, r1: int, r2: int, convention: str) -> float:
    """Paper eq. 7: s = alpha² / sqrt(r1 r2). Released code: s = sqrt(alpha) * sqrt(alpha) = alpha."""
    if convention == "paper":
        return alpha**2 / math.sqrt(r1 * r2)
    if convention == "released":
        return float(alpha)
    raise ValueError(f"unknown ABBA scaling convention {convention!r}")


def cost_constants() -> dict[str, float]:
    """The constants `auto` uses now (module globals, so a calibration can be tried by setting them)."""
    return {k: globals()[k] for k in COST_CONSTANTS}


def path_costs(
    m: int,
    n: int,
    r1: int,
    r2: int,
    tokens: int,
    dropout: bool = False,
    constants: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Modelled cost of each exact path for one layer and micro-batch (module docstring), in big-matmul MACs.

    `constants` overrides the module's; its values may be tensors (a whole grid of candidate calibrations at
    once, as `benchmarks/layer_sweep.py --fit` uses), the costs are then tensors of the same shape.
    """
    c = constants or cost_constants()
    kr_macs = r1 * r2 * (m + n) * tokens  # one skinny matmul over all tokens
    kr_build = 2 * r1 * r2 * (m + n)  # B* and A*
    build = m * n * (c["BUILD_COST"] * (r1 + r2) + c["ELEMENT_COST"])  # B1A1, B2A2, W0 + s·B1A1⊙B2A2 once
    stream = c["KR_ELEMENT_COST"] * (m + n) * tokens  # one pair of skinny matmuls' activation traffic
    costs = {"khatri_rao": c["KR_COST"] * (3 * kr_macs + kr_build) + 3 * stream}
    if dropout:
        # x and dropout(x) differ: x W0ᵀ + x_a dWᵀ forward, dy W0 and dy dW backward, plus G.
        costs["merged"] = 3 * m * n * tokens + 4 * build
    else:
        costs["merged"] = m * n * tokens + 4 * build
        costs["hybrid"] = c["HYBRID_COST"] * (2 * kr_macs + kr_build) + 2 * stream + 2 * build
    return costs


def choose_path(
    m: int, n: int, r1: int, r2: int, tokens: int, dropout: bool = False, constants: dict | None = None
) -> str:
    """The cheapest exact path for one layer and micro-batch by the cost model (ties: the listed order)."""
    costs = path_costs(m, n, r1, r2, tokens, dropout, constants)
    return min(costs, key=costs.__getitem__)


def khatri_rao_factors(
    B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (B*, A*) of rank r1*r2 with B* @ A* == (B1 @ A1) * (B2 @ A2) exactly in exact arithmetic.

    B*[i, j*r2 + k] = B1[i, j] * B2[i, k] and A*[j*r2 + k, c] = A1[j, c] * A2[k, c], so
    (B* A*)[i, c] = sum_jk B1[i,j] A1[j,c] B2[i,k] A2[k,c] = (B1 A1)[i,c] (B2 A2)[i,c].
    """
    return khatri_rao_b(B1, B2), khatri_rao_a(A1, A2)


def khatri_rao_b(B1: torch.Tensor, B2: torch.Tensor) -> torch.Tensor:
    """B* (m, r1 r2), built r-major ((m, r1, r2) contiguous): the reshape is a free view and matmuls read it
    without a transpose copy."""
    m, r1 = B1.shape
    return (B1[:, :, None] * B2[:, None, :]).reshape(m, r1 * B2.shape[1])


def khatri_rao_a(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """A* (r1 r2, n), built r-major ((r1, r2, n) contiguous), like `khatri_rao_b`."""
    r1, n = A1.shape
    return (A1[:, None, :] * A2[None, :, :]).reshape(r1 * A2.shape[0], n)


def _scaled_khatri_rao_b(B1, B2, dtype, scale: float) -> torch.Tensor:
    """B* in `dtype` with `s` folded in through B1 (m, r1): cheaper than scaling a (T, m) or (T, r1r2) activation.
    `.to(dtype)` is a no-op when the factors are already `dtype`."""
    b1 = B1.to(dtype)
    return khatri_rao_b(b1 * scale if scale != 1.0 else b1, B2.to(dtype))


class _KhatriRaoDelta(Function):
    """y = s · B* (A* x): the adapter's output only (the frozen base matmul runs outside, under autograd)."""

    @staticmethod
    def forward(ctx, x, scaling, B1, A1, B2, A2):
        dtype = x.dtype
        b_kr = _scaled_khatri_rao_b(B1, B2, dtype, scaling)
        a_kr = khatri_rao_a(A1.to(dtype), A2.to(dtype))
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
        b_kr = _scaled_khatri_rao_b(B1, B2, dtype, s)  # rebuilt, not saved; s inside b_kr
        a_kr = khatri_rao_a(A1.to(dtype), A2.to(dtype))
        dy2 = dy.reshape(-1, b_kr.shape[0]).to(dtype)  # (T, m)
        x2 = x.reshape(-1, a_kr.shape[1])  # (T, n)
        dh = dy2 @ b_kr  # (T, r1r2) = s · dy B*
        dx = (dh @ a_kr).reshape(x.shape) if ctx.needs_input_grad[0] else None  # (T, n)
        return (dx, None, *_khatri_rao_factor_grads(dy2, x2, h, dh, B1, A1, B2, A2, s))


def _khatri_rao_factor_grads(dy2, x2, h, dh, B1, A1, B2, A2, s: float):
    """dB1, dA1, dB2, dA2 from dL/dB* = s·dyᵀh and dL/dA* = dhᵀx (h = x A*ᵀ, dh = s·dy B*), in the factors' dtype.

    B*[k, i r2 + j] = B1[k, i] B2[k, j] and A*[i r2 + j, c] = A1[i, c] A2[j, c]: the B sums are batched mat-vecs
    (no (m, r1, r2) temporary), s is applied to the small (m, r) results.
    """
    dtype = dy2.dtype
    m, r1 = B1.shape
    r2, n = A2.shape
    db_kr = (dy2.T @ h).view(m, r1, r2)  # dL/dB* / s
    da_kr = (dh.T @ x2).view(r1, r2, n)  # dL/dA*
    b1, b2 = B1.to(dtype), B2.to(dtype)
    dB1 = torch.bmm(db_kr, b2[:, :, None]).squeeze(2).mul_(s)  # (m, r1)
    dB2 = torch.bmm(b1[:, None, :], db_kr).squeeze(1).mul_(s)  # (m, r2)
    dA1 = (da_kr * A2.to(dtype)[None, :, :]).sum(1)  # (r1, n)
    dA2 = (da_kr * A1.to(dtype)[:, None, :]).sum(0)  # (r2, n)
    return dB1.to(B1.dtype), dA1.to(A1.dtype), dB2.to(B2.dtype), dA2.to(A2.dtype)


def _products(B1, A1, B2, A2, dtype):
    """B1 A1 and B2 A2, each (m, n), in `dtype`."""
    return B1.to(dtype) @ A1.to(dtype), B2.to(dtype) @ A2.to(dtype)


def _merged_weight(weight, p1, p2, scaling, dtype):
    """W0 + s (B1 A1) ⊙ (B2 A2) in `dtype`, in one fused pass (addcmul)."""
    return torch.addcmul(weight.to(dtype), p1, p2, value=scaling)


def _merged_linear(x, weight, bias, scaling, B1, A1, B2, A2):
    """x (W0 + dW)ᵀ + b: the frozen layer's own matmul, the update riding along for free."""
    dtype = x.dtype
    w = _merged_weight(weight, *_products(B1, A1, B2, A2, dtype), scaling, dtype)
    return F.linear(x, w, None if bias is None else bias.to(dtype))


class _MergedABBA(Function):
    """y = x (W0 + dW)ᵀ + b in one matmul, or x W0ᵀ + b + x_a dWᵀ when dropout makes the adapter input differ.

    Saves only x (and x_a) and the factors; W0 + dW and dW are rebuilt in backward.
    """

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, scaling, B1, A1, B2, A2):
        dtype = x.dtype
        if x_adapter is None:
            y = _merged_linear(x, weight, bias, scaling, B1, A1, B2, A2)
        else:
            p1, p2 = _products(B1, A1, B2, A2, dtype)
            delta = p1.mul_(p2).mul_(scaling)  # (m, n), freed on return
            b = None if bias is None else bias.to(dtype)
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
        p1, p2 = _products(B1, A1, B2, A2, dtype)  # rebuilt (m, n) each
        if x_adapter is None:
            if need_x:  # skipped (and W0 + dW not rebuilt) when x needs no gradient, e.g. the first layer's
                dx = (dy2 @ _merged_weight(weight, p1, p2, s, dtype)).reshape(x.shape)
            src = x.reshape(-1, n)
        else:
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


class _HybridABBA(Function):
    """y = x (W0 + dW)ᵀ + b in one matmul, dx through W0 + dW; factor gradients the Khatri-Rao way (no G = dyᵀx).

    Saves x, h = x A*ᵀ (T, r1r2; what the Khatri-Rao path saves too) and the factors; W0 + dW, B*, A* are rebuilt
    in backward. Only for the no-dropout case (x is the adapter's input too).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scaling, B1, A1, B2, A2):
        dtype = x.dtype
        y = _merged_linear(x, weight, bias, scaling, B1, A1, B2, A2)
        a_kr = khatri_rao_a(A1.to(dtype), A2.to(dtype))  # B* is not needed until backward
        h = x.reshape(-1, x.shape[-1]) @ a_kr.T  # (T, r1r2)
        ctx.save_for_backward(x, h, weight, bias, B1, A1, B2, A2)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, weight, bias, B1, A1, B2, A2 = ctx.saved_tensors
        s = ctx.scaling
        dtype = x.dtype
        m, n = weight.shape
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy2 = dy.reshape(-1, m).to(dtype)  # (T, m)
        x2 = x.reshape(-1, n)
        dx = dw = db = None
        if need_x:
            dx = (dy2 @ _merged_weight(weight, *_products(B1, A1, B2, A2, dtype), s, dtype)).reshape(x.shape)
        if need_w:
            dw = (dy2.T @ x2).to(weight.dtype)
        if need_b and bias is not None:
            db = dy2.sum(0).to(bias.dtype)
        dh = dy2 @ _scaled_khatri_rao_b(B1, B2, dtype, s)  # (T, r1r2) = s · dy B*; A* not needed
        return (dx, dw, db, None, *_khatri_rao_factor_grads(dy2, x2, h, dh, B1, A1, B2, A2, s))


def _init_device(weight: torch.Tensor) -> torch.device:
    if weight.device.type == "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return weight.device


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
        # The SVD runs on the GPU when there is one (Mistral-7B's 224 layers: ~150 s of CPU SVD per process
        # before this); every process uses the same device type, so every process gets the same factors.
        w = self.weight.detach().to(_init_device(self.weight)).float()
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

    def resolved_path(self, tokens: int, dropout: bool = False) -> str:
        """The path a forward over `tokens` tokens runs. With dropout active there is no hybrid path: a forced
        `hybrid` then runs as `khatri_rao`, its gradient half (training with dropout stays exact, just not fused)."""
        if self.path == "auto":
            return choose_path(self.out_features, self.in_features, self.r1, self.r2, tokens, dropout)
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
            if path == "khatri_rao":
                return self.base_forward(x, dtype) + _KhatriRaoDelta.apply(x_adapter, self.scaling, *factors)
            if path == "hybrid" and torch.is_grad_enabled():
                return _HybridABBA.apply(x, self.weight, self.bias, self.scaling, *factors)
            # (hybrid without gradients: its forward is the merged one, minus the h it would save)
            x_adapter = x_adapter if dropout else None
            return _MergedABBA.apply(x, x_adapter, self.weight, self.bias, self.scaling, *factors)


def describe_paths(model: nn.Module, tokens: int) -> str | None:
    """One line saying which exact path each ABBA layer runs for a micro-batch of `tokens` tokens (None: no ABBA).

    Adapter dropout counts as it will in training (it is what decides whether the fused paths exist).
    """
    by_path: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, ABBALinear):
            dropout = isinstance(module.dropout, nn.Dropout) and module.dropout.p > 0
            by_path.setdefault(module.resolved_path(tokens, dropout), []).append(name)
    if not by_path:
        return None
    parts = []
    for path, names in sorted(by_path.items()):
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        parts.append(f"{path} on {len(names)} ({', '.join(kinds)})")
    return f"ABBA execution at {tokens} tokens per micro-batch: " + "; ".join(parts)
