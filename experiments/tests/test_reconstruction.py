"""The ABBA reconstruction solver (experiments/reconstruction.py): exact recovery, SVD sandwich, monotone ALS."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experiments import reconstruction as R


def _abba_target(m: int, n: int, r1: int, r2: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B1, A1 = torch.randn(m, r1, generator=g), torch.randn(r1, n, generator=g)
    B2, A2 = torch.randn(m, r2, generator=g), torch.randn(r2, n, generator=g)
    return ((B1 @ A1) * (B2 @ A2)).double()


def test_recovers_exact_abba_target() -> None:
    M = _abba_target(40, 30, 2, 2, seed=0)
    # single starts do get stuck in local minima here; screening many starts is what makes it reliable
    starts = ("svd_ones", "sqrt_svd", *(f"random{i}" for i in range(6)))
    fit = R.fit_abba(M, 2, 2, sweeps=100, inits=starts, seed=0, screen_sweeps=15, keep=3)
    assert fit.error < 1e-6
    assert torch.allclose(fit.factors.product(), M, atol=1e-6 * float(M.abs().max()))


@pytest.mark.parametrize("r", [4, 8])
@pytest.mark.parametrize("kind", ["gaussian", "power-law"])
def test_error_between_svd_bounds(kind: str, r: int) -> None:
    M = R.synthetic_matrices(48, 36, seed=1)[kind]
    errs = R.svd_errors(M)
    fit = R.fit_abba(M, r // 2, r // 2, sweeps=20, seed=0, screen_sweeps=5, keep=2)
    # the svd_ones start begins at the rank-(r/2) SVD error and ALS never goes up
    assert fit.error <= R.rank_error(errs, r // 2) + 1e-9
    # (B1A1) ⊙ (B2A2) has rank <= r1*r2, so Eckart-Young at r1*r2 is a floor no correct fit crosses
    assert fit.error >= R.rank_error(errs, (r // 2) ** 2) - 1e-9


def test_svd_errors_match_truncated_svd() -> None:
    M = R.synthetic_matrices(20, 12, seed=2)["gaussian"]
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    k = 5
    direct = torch.linalg.norm(M - U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]) / torch.linalg.norm(M)
    assert abs(float(direct) - R.rank_error(R.svd_errors(M), k)) < 1e-12


@pytest.mark.parametrize("init", ["svd_ones", "sqrt_svd", "random0"])
def test_als_error_never_increases(init: str) -> None:
    M = R.synthetic_matrices(40, 30, seed=3)["lowrank+noise"]
    fit = R.fit_abba(M, 3, 3, sweeps=25, inits=(init,), seed=0, tol=0.0)
    hist = fit.histories[init]
    assert len(hist) == 26
    for before, after in zip(hist, hist[1:], strict=False):
        assert after <= before * (1 + 1e-10)
    assert hist[-1] < hist[0]


def test_quant_residual_is_small_and_blockwise() -> None:
    W = torch.randn(8, 64, dtype=torch.float64)
    res = R.quant_residual(W, bits=2, block=32)
    step = (W.reshape(-1, 32).max(1).values - W.reshape(-1, 32).min(1).values) / 3
    assert (res.reshape(-1, 32).abs().max(1).values <= step / 2 + 1e-12).all()


def test_update_results_md_touches_only_its_block(tmp_path: Path) -> None:
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## Someone else\n\nkeep me\n")
    R.update_results_md("table v1", md)
    R.update_results_md("table v2", md)
    text = md.read_text()
    assert "keep me" in text and "table v2" in text and "table v1" not in text
    assert text.count(R.SECTION_TITLE) == 1
