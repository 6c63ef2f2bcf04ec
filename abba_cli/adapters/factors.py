"""An adapter's update as a thin product, and the SVD of a thin product without forming it.

Every low-rank update we store is dW = s P Q with P (m, R) and Q (R, n):
- ABBA: (B1 A1) ⊙ (B2 A2) = B* A*, the Khatri-Rao factors of rank r1 r2 (ARCHITECTURE.md section 1); a chain
  of K pairs the same way, rank prod r_k;
- LoRA: B A; PiSSA trains against W0 - s B0 A0, so relative to W0 its update is s [B, -B0] [A; A0].
Export, rank-K truncation and inspect all start from this form; the SVD below never sees an (m, n) matrix:

    P = Qp Rp (m, p)(p, R),  Qᵀ = Qq Rq (n, q)(q, R)      thin QR, p = min(m, R), q = min(n, R)
    P Q = Qp (Rp Rqᵀ) Qqᵀ,   Rp Rqᵀ = U Σ Vᵀ (p, q)        so dW's singular values are Σ's, exactly
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from abba_cli.adapters.chain import khatri_rao_chain, pairs_of


def thin_factors(kind: str, factors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q) with P @ Q the unscaled update of an `abba` or `lora` (`lora_pro`) layer's stored factors (dtype
    kept); for `dora`, its LoRA part B A (the magnitude rescales W0 + s B A, which PEFT's DoRA form keeps)."""
    if kind == "abba":  # two pairs or a chain of K: the K-fold Khatri-Rao factors (chain.py), rank prod r_k
        return khatri_rao_chain(pairs_of(factors))
    if kind not in ("lora", "lora_pro", "dora"):
        raise ValueError(f"{kind} updates have no thin-product form")
    B, A = factors["B"], factors["A"]
    if "B0" in factors:
        B = torch.cat([B, -factors["B0"]], dim=1)  # (m, 2r)
        A = torch.cat([A, factors["A0"]], dim=0)  # (2r, n)
    return B, A


@dataclass
class FactoredSVD:
    """P Q = left @ diag(sigma) @ right, float64; left (m, c) and right (c, n) have orthonormal columns/rows."""

    left: torch.Tensor
    sigma: torch.Tensor  # (c,) descending
    right: torch.Tensor


def factored_svd(P: torch.Tensor, Q: torch.Tensor) -> FactoredSVD:
    """The thin SVD of P @ Q (P (m, R), Q (R, n)) through two thin QRs and one small SVD, in float64."""
    qp, rp = torch.linalg.qr(P.double())  # (m, p), (p, R)
    qq, rq = torch.linalg.qr(Q.double().T)  # (n, q), (q, R)
    u, sigma, vh = torch.linalg.svd(rp @ rq.T, full_matrices=False)  # (p, c), (c,), (c, q)
    return FactoredSVD(qp @ u, sigma, vh @ qq.T)


def factored_singular_values(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Singular values of P @ Q, descending, float64, without the singular vectors' cost."""
    _, rp = torch.linalg.qr(P.double(), mode="reduced")
    _, rq = torch.linalg.qr(Q.double().T, mode="reduced")
    return torch.linalg.svdvals(rp @ rq.T)
