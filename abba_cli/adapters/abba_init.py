"""ABBA's initialisations (`adapter.init`), for two pairs and for chains of K pairs.

Every strategy keeps the step-0 model equal to the base by a zero factor: one B (or one A) of the last pair is 0,
so (B1 A1) ⊙ ... ⊙ (BK AK) = 0 exactly, whatever the other factors hold. None zeroes two factors of different
pairs: then every gradient would stay 0 for good (each factor's gradient carries the other pairs' products).
At step 0 only the zeroed factor gets a gradient; after one optimizer step every factor does.

    svd (ours, the default; the authors' released code): B1 = U_r1 Σ^½, A1 = Σ^½ V_r1ᵀ from W0's top r1
        singular triplets; B2 = 0; A2 Kaiming-uniform. Chains: every pair but the last from W0's top-r_k SVD.
    random: B1, A1, A2 Kaiming-uniform, B2 = 0 (no reference to W0; chains: every pair but the last random).
    svd_second: the SVD pair is the second: B1 = 0, A1 Kaiming-uniform, B2 A2 = W0's top-r2 SVD.
    svd_minor: B1 A1 from W0's r1 smallest singular triplets (the minor directions), B2 = 0, A2 Kaiming.
    svd_zero_a2: B1 A1 as in svd; A2 = 0 and B2 Kaiming-uniform (the other factor of pair 2 is the zero one).
    svd_a2: B1 A1 as in svd; B2 = 0, A2 = Σ^½ V_r2ᵀ of W0 (A2 from W0's right singular vectors, not random).

The SVD is computed in fp32 on the GPU when there is one (every process uses the same device type, so every
process gets the same factors); svd_lowrank draws its random projection from the global RNG, which is seeded
from the layer's own generator so every process and rerun gets the same factors.
"""

from __future__ import annotations

import torch

from abba_cli.adapters.base import kaiming_uniform

ABBA_INITS = ("svd", "random", "svd_second", "svd_minor", "svd_zero_a2", "svd_a2")
CHAIN_INITS = ("svd", "random")  # the strategies defined for K != 2 pairs


def _svd_device(weight: torch.Tensor) -> torch.device:
    if weight.device.type == "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return weight.device


def top_svd(w0: torch.Tensor, r: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r Σ^½ (m, r), Σ^½ V_rᵀ (r, n)) of W0's top r singular triplets (randomised, seeded from `gen`)."""
    w = w0.float().to(_svd_device(w0))
    with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        u, sigma, v = torch.svd_lowrank(w, q=min(r + 10, min(w.shape)), niter=4)
    root = sigma[:r].sqrt()
    return (u[:, :r] * root).to(w0.device), (root[:, None] * v[:, :r].T).to(w0.device)


def minor_svd(w0: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same split of W0's r smallest singular triplets (an exact SVD: the randomised one finds the top)."""
    u, sigma, vh = torch.linalg.svd(w0.float(), full_matrices=False)
    root = sigma[-r:].sqrt()
    return u[:, -r:] * root, root[:, None] * vh[-r:]


def init_pairs(
    strategy: str, w0: torch.Tensor, ranks: list[int], gen: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(B1, A1), ..., (BK, AK)] (fp32, on W0's device) for `strategy`; W0 is the frozen weight (m, n)."""
    m, n = w0.shape
    device = w0.device

    def kaiming(shape: tuple[int, int]) -> torch.Tensor:
        return kaiming_uniform(shape, gen).to(device)

    def zeros(shape: tuple[int, int]) -> torch.Tensor:
        return torch.zeros(shape, device=device)

    if len(ranks) != 2 and strategy not in CHAIN_INITS:
        raise ValueError(f"init {strategy!r} is defined for two pairs; chains take {', '.join(CHAIN_INITS)}")
    *inner, last = ranks
    if strategy in ("svd", "random"):
        pairs = [
            top_svd(w0, r, gen) if strategy == "svd" else (kaiming((m, r)), kaiming((r, n))) for r in inner
        ]
        return [*pairs, (zeros((m, last)), kaiming((last, n)))]
    r1, r2 = ranks
    if strategy == "svd_second":
        a1 = kaiming((r1, n))
        return [(zeros((m, r1)), a1), top_svd(w0, r2, gen)]
    if strategy == "svd_minor":
        return [minor_svd(w0, r1), (zeros((m, r2)), kaiming((r2, n)))]
    if strategy == "svd_zero_a2":
        b1a1 = top_svd(w0, r1, gen)
        return [b1a1, (kaiming((m, r2)), zeros((r2, n)))]
    if strategy == "svd_a2":
        b1a1 = top_svd(w0, r1, gen)
        return [b1a1, (zeros((m, r2)), top_svd(w0, r2, gen)[1])]
    raise ValueError(f"unknown ABBA init {strategy!r}; valid: {', '.join(ABBA_INITS)}")
