"""The cost model `auto` picks ABBA's execution path with, per device type (see abba.py for the paths).

Costs are in units of one multiply-add of a big (m, n, T) matmul in the compute dtype. Terms:
- KR_COST: one multiply-add of the Khatri-Rao path's skinny matmuls (inner or outer size r1*r2: less work per
  byte moved than the big square-ish ones).
- HYBRID_COST: the same for the hybrid path's gradient matmuls.
- BUILD_COST: one multiply-add of building B1A1 and B2A2 (an (m, n) output) or of the merged path's small
  gradient matmuls that read an (m, n) matrix.
- Memory traffic, per element moved: ELEMENT_COST per (m, n) element of one build (the element-wise passes
  W0 + s·P1⊙P2, G⊙P and the (m, n) writes are memory-bound) and KR_ELEMENT_COST per activation element
  T·(m + n) that a pair of skinny matmuls streams (reads x or dy, writes a (T, m) or (T, n) result).
- LAUNCH_COST: per kernel launch (`LAUNCHES`: the ops each path's forward + backward runs). On a GPU at the
  shipped micro-batch (1 x 512 tokens) a layer's matmuls take tens of microseconds and each launch several, so
  this term, not the arithmetic, decides.

The constants are held per device type in plain dicts resolved by the layer's weight device on each call (a dict
lookup: `torch.compile` traces it as a constant). `benchmarks/layer_sweep.py --fit` fits them on a device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

COST_CONSTANTS = ("KR_COST", "HYBRID_COST", "BUILD_COST", "ELEMENT_COST", "KR_ELEMENT_COST", "LAUNCH_COST")

# CPU: a launch costs microseconds against matmuls of milliseconds, so no launch term. How each device's
# constants were fitted, and how well they pick: benchmarks/RESULTS.md, "Fitted cost constants".
CPU_COSTS = {
    "KR_COST": 0.708,
    "HYBRID_COST": 0.92,
    "BUILD_COST": 0.501,
    "ELEMENT_COST": 45.3,
    "KR_ELEMENT_COST": 16.0,
    "LAUNCH_COST": 0.0,
}
# CUDA (and other accelerators, launch-bound in the same regime): the launch cost is held at about 10 us of
# big-matmul work, what an eager op costs there; refit with `benchmarks/layer_sweep.py --fit` on a new sweep.
CUDA_COSTS = {
    "KR_COST": 1.148,
    "HYBRID_COST": 1.148,
    "BUILD_COST": 0.316,
    "ELEMENT_COST": 64.0,
    "KR_ELEMENT_COST": 1024.0,
    "LAUNCH_COST": 3.16e9,
}
DEVICE_COSTS = {"cpu": CPU_COSTS, "cuda": CUDA_COSTS}

PATHS = ("khatri_rao", "merged", "hybrid")

# Kernel-launching ops of one forward + backward of an adapted layer (its frozen matmuls included, x needing a
# gradient, fp32 factors in a bf16 computation; with dropout, its own 3 ops and the sum of x's two gradients too),
# per path and by (dropout, r1 == r2): what abba.py runs, as benchmarks/layer_sweep.py counts it, checked by
# tests/benchmarks/test_bench_op_count.py. The merged and hybrid paths build B1A1 and B2A2 in one batched matmul
# when r1 == r2.
LAUNCHES = {
    (False, True): {"khatri_rao": 21, "merged": 13, "hybrid": 21},
    (False, False): {"khatri_rao": 21, "merged": 18, "hybrid": 23},
    (True, True): {"khatri_rao": 27, "merged": 21},
    (True, False): {"khatri_rao": 27, "merged": 26},
}


def constants_name(device_type: str) -> str:
    """Which constants `auto` prices a device type with, in words (the plan line and `abba validate` say it)."""
    if device_type in DEVICE_COSTS:
        return f"the {device_type.upper()} constants"
    return f"the CUDA constants ({device_type} has none of its own)"


def cost_constants(device_type: str = "cpu") -> dict[str, float]:
    """The constants `auto` uses on a device type (a copy; accelerators other than CUDA use CUDA's)."""
    return dict(DEVICE_COSTS.get(device_type, CUDA_COSTS))


def path_launches(r1: int, r2: int, dropout: bool = False) -> dict[str, int]:
    return LAUNCHES[(dropout, r1 == r2)]


def path_costs(
    m: int,
    n: int,
    r1: int,
    r2: int,
    tokens: int,
    dropout: bool = False,
    constants: Mapping[str, Any] | None = None,
    launches: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Modelled cost of each exact path for one layer and micro-batch, in big-matmul multiply-adds.

    `constants` (default: the CPU's) may hold tensors: a whole grid of candidate calibrations at once, as
    `benchmarks/layer_sweep.py --fit` uses; the costs are then tensors of that shape. `launches` (default:
    `LAUNCHES`, today's code) lets a fit price the launches of the code a sweep measured.
    """
    c = CPU_COSTS if constants is None else constants
    ops = path_launches(r1, r2, dropout) if launches is None else launches
    launch = c.get("LAUNCH_COST", 0.0)
    kr_macs = r1 * r2 * (m + n) * tokens  # one skinny matmul over all tokens
    kr_build = 2 * r1 * r2 * (m + n)  # B* and A*
    build = m * n * (c["BUILD_COST"] * (r1 + r2) + c["ELEMENT_COST"])  # B1A1, B2A2, W0 + s·B1A1⊙B2A2 once
    stream = c["KR_ELEMENT_COST"] * (m + n) * tokens  # one pair of skinny matmuls' activation traffic
    costs = {"khatri_rao": c["KR_COST"] * (3 * kr_macs + kr_build) + 3 * stream + launch * ops["khatri_rao"]}
    if dropout:
        # x and dropout(x) differ: x W0ᵀ + x_a dWᵀ forward, dy W0 and dy dW backward, plus G.
        costs["merged"] = 3 * m * n * tokens + 4 * build + launch * ops["merged"]
    else:
        costs["merged"] = m * n * tokens + 4 * build + launch * ops["merged"]
        costs["hybrid"] = (
            c["HYBRID_COST"] * (2 * kr_macs + kr_build) + 2 * stream + 2 * build + launch * ops["hybrid"]
        )
    return costs


def choose_path(
    m: int,
    n: int,
    r1: int,
    r2: int,
    tokens: int,
    dropout: bool = False,
    constants: Mapping[str, Any] | None = None,
) -> str:
    """The cheapest exact path for one layer and micro-batch by the cost model (ties: the listed order)."""
    costs = path_costs(m, n, r1, r2, tokens, dropout, constants)
    best = PATHS[0]
    for path, value in costs.items():  # a loop, not min(key=): torch.compile traces it with a symbolic T too
        if value < costs[best]:
            best = path
    return best


def chain_path_costs(
    m: int,
    n: int,
    ranks: list[int],
    tokens: int,
    dropout: bool = False,
    constants: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The two-pair model's terms for a chain of K pairs (chain.py), R = prod r_k: the Khatri-Rao path's three
    skinny matmuls over R, plus building B* and A*; the merged path's big matmul(s) plus four builds of the K
    products (each sum(r_k)·m·n multiply-adds and K - 1 element-wise passes). Launches are not priced: the
    constants were fitted on two pairs, and neither chain path has been launch-counted."""
    c = CPU_COSTS if constants is None else constants
    big_r = math.prod(ranks)
    kr_macs = big_r * (m + n) * tokens
    kr_build = 2 * big_r * (m + n) * (len(ranks) - 1)
    stream = c["KR_ELEMENT_COST"] * (m + n) * tokens
    build = m * n * (c["BUILD_COST"] * sum(ranks) + c["ELEMENT_COST"] * (len(ranks) - 1))
    return {
        "khatri_rao": c["KR_COST"] * (3 * kr_macs + kr_build) + 3 * stream,
        "merged": (3 if dropout else 1) * m * n * tokens + 4 * build,
    }


def choose_chain_path(
    m: int,
    n: int,
    ranks: list[int],
    tokens: int,
    dropout: bool = False,
    constants: Mapping[str, Any] | None = None,
) -> str:
    costs = chain_path_costs(m, n, ranks, tokens, dropout, constants)
    return "khatri_rao" if costs["khatri_rao"] <= costs["merged"] else "merged"
