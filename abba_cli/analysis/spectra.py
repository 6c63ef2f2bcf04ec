"""`abba inspect`: how much rank a trained update dW actually uses, layer by layer.

For every adapted layer: the singular values of dW in float64, computed from the saved factors (never from an
m x n matrix when a factored form exists), the entropy effective rank, the rank holding 90% of the energy and
||dW||_F / ||W0||_F. ABBA's dW = s (B1 A1) ⊙ (B2 A2) is exactly s B* A* with the Khatri-Rao factors of rank
r1 r2, LoRA's is s B A (PiSSA: s (B A - B0 A0), a rank-2r product), so both are a thin product P Q: QR of P and
of Qᵀ leaves a small core R_P R_Qᵀ whose singular values are dW's. HiRA's dW = s W0 ⊙ (B A) and a full
fine-tuning run's W_run - W0 have no such form and are decomposed whole (float64, one layer at a time).

Base and full-run weights are read lazily from their safetensors files, one tensor at a time, so a 7B model
never sits in memory; only the (small) adapter factors are read whole.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from abba_cli.errors import UserError
from abba_cli.run.layout import read_val_summary

ENERGY = 0.9  # the energy rank reported: smallest k whose top-k singular values hold 90% of ||dW||_F^2
_DEPTH = re.compile(r"\.(\d+)\.")


# ----------------------------------------------------------------------------------------------- the math


def effective_rank(sv: np.ndarray) -> float:
    """exp(entropy) of the singular values normalised to sum 1 (Roy & Vetterli 2007); 0 for dW = 0.

    Between 1 (one direction) and the number of non-zero values (all equal)."""
    sv = np.asarray(sv, dtype=np.float64)
    sv = sv[sv > 0]
    if sv.size == 0:
        return 0.0
    p = sv / sv.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def energy_rank(sv: np.ndarray, fraction: float = ENERGY) -> int:
    """Smallest k with sum of the k largest sigma^2 >= fraction * sum sigma^2 (0 for dW = 0)."""
    energy = np.sort(np.asarray(sv, dtype=np.float64) ** 2)[::-1]
    total = energy.sum()
    if total == 0:
        return 0
    # The tiny relative slack keeps a split that is exactly 90% in exact arithmetic from tipping over by round-off.
    return int(np.searchsorted(np.cumsum(energy), fraction * total * (1 - 1e-12)) + 1)


def numerical_floor(sv: np.ndarray, shape: tuple[int, int]) -> float:
    """Values at or below this are round-off of a float64 decomposition (numpy.linalg.matrix_rank's tolerance)."""
    top = float(np.max(sv)) if len(sv) else 0.0
    return top * max(shape) * np.finfo(np.float64).eps


def dense_singular_values(dw: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(dw.to(torch.float64))


# ----------------------------------------------------------------------------------------------- reading


class SafetensorsFolder:
    """A Hugging Face model folder's tensors by name, read one at a time (memory-mapped, nothing else loaded)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: folder / v for k, v in weight_map.items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    self.files.update({k: path for k in f.keys()})  # noqa: SIM118 (a handle, not a dict)
        if not self.files:
            raise UserError(
                f"{folder}: no safetensors weights (model.safetensors or an index) to read W0 from"
            )

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.files:
            raise UserError(f"{self.folder}: no tensor {key!r}: was the run trained on another base model?")
        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key).to(torch.float64)

    def shape(self, key: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())


def weights_folder(name: str) -> Path:
    """The local folder holding `name`'s safetensors: the directory itself, the hub cache (download only when
    the hub is in use), or the bundled SmolLM2 copy when the hub is unreachable."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    from abba_cli.models.bundled import bundled_stand_in
    from abba_cli.util.hub import use_hub

    try:
        patterns = ["*.safetensors", "*.json"]
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=not use_hub()))
    except Exception as err:  # huggingface_hub raises several unrelated types for "not available"
        stand_in = bundled_stand_in(name, f"W0 of {name} is not in the hub cache ({type(err).__name__})")
        if stand_in is not None:
            return stand_in
        raise UserError(
            f"base model {name}: not a local directory and not in the hub cache ({type(err).__name__}); "
            "pass --base PATH"
        ) from None


# ----------------------------------------------------------------------------------------------- one layer


@dataclass
class LayerStats:
    module: str
    shape: tuple[int, int]
    rank_bound: int  # the most rank this method's dW can have in this layer
    singular_values: np.ndarray  # float64, descending, round-off (numerical_floor) dropped
    w0_norm: float

    @property
    def module_type(self) -> str:
        return self.module.rsplit(".", 1)[-1]

    @property
    def depth(self) -> int | None:
        m = _DEPTH.search(self.module + ".")
        return int(m.group(1)) if m else None

    @property
    def dw_norm(self) -> float:
        return float(np.sqrt((self.singular_values**2).sum()))

    def as_json(self) -> dict[str, Any]:
        sv = self.singular_values
        return {
            "module": self.module,
            "module_type": self.module_type,
            "depth": self.depth,
            "shape": list(self.shape),
            "rank_bound": self.rank_bound,
            "numerical_rank": int(sv.size),
            "effective_rank": effective_rank(sv),
            "energy_rank_90": energy_rank(sv),
            "dw_fro": self.dw_norm,
            "w0_fro": self.w0_norm,
            "rel_norm": self.dw_norm / self.w0_norm if self.w0_norm else None,
            "singular_values": sv.tolist(),
        }


def _stats(module: str, shape: tuple[int, int], bound: int, sv: torch.Tensor, w0_norm: float) -> LayerStats:
    values = np.sort(sv.numpy().astype(np.float64))[::-1]
    values = values[values > numerical_floor(values, shape)]
    return LayerStats(module, shape, min(bound, *shape), values, w0_norm)


def adapter_layer_stats(
    kind: str, scaling: float, f: dict[str, torch.Tensor], w0: torch.Tensor | None, module: str
) -> LayerStats:
    """LayerStats of one adapted layer from its stored factors (w0 needed for HiRA and the norm ratio)."""
    from abba_cli.adapters.factors import factored_singular_values, thin_factors

    f = {k: v.to(torch.float64) for k, v in f.items()}
    if kind in ("abba", "lora", "lora_pro"):
        b, a = thin_factors(kind, f)  # rank bound: r1 r2 for ABBA, r (PiSSA 2r) for LoRA
        sv, bound = abs(scaling) * factored_singular_values(b, a), b.shape[1]
    elif kind == "dora":  # m ⊙ W / ||W|| - W0 with W = W0 + s B A: rescaled rows of W0, full rank in general
        if w0 is None:
            raise UserError(
                f"{module}: DoRA's dW = m (W0 + s B A) / ||W0 + s B A|| - W0 needs the base weight"
            )
        w = w0.double() + scaling * (f["B"] @ f["A"])
        sv = dense_singular_values((f["m"] / torch.linalg.vector_norm(w, dim=1))[:, None] * w - w0.double())
        bound = min(w0.shape)
    else:  # hira: W0 ⊙ (B A) is full rank in general; no thin form to exploit
        if w0 is None:
            raise UserError(f"{module}: HiRA's dW = s W0 ⊙ (B A) needs the base weight")
        sv = dense_singular_values(scaling * w0 * (f["B"] @ f["A"]))
        bound = min(w0.shape)
    shape = (f["B1"].shape[0], f["A1"].shape[1]) if kind == "abba" else (f["B"].shape[0], f["A"].shape[1])
    norm = float(torch.linalg.matrix_norm(w0)) if w0 is not None else 0.0
    return _stats(module, shape, bound, abs(sv), norm)


# ----------------------------------------------------------------------------------------------- one run


@dataclass
class RunReport:
    run: Path
    method: str  # abba, lora, pissa, rslora, hira, full
    settings: str  # e.g. "r1=8 r2=8 s=32"
    trainable: int
    layers: list[LayerStats]
    seconds: float
    val: dict | None  # val_summary.json, when the run has validation

    def as_json(self) -> dict[str, Any]:
        return {
            "run": str(self.run),
            "method": self.method,
            "settings": self.settings,
            "trainable_params": self.trainable,
            "seconds": round(self.seconds, 3),
            "validation": self.val,
            "layers": [layer.as_json() for layer in self.layers],
        }


def _adapter_method(cfg: dict) -> tuple[str, str]:
    s = f"s={cfg['scaling']:g}"
    if cfg["type"] == "abba":
        if cfg.get("ranks"):
            return "abba", f"ranks={cfg['ranks']} {s}"
        return "abba", f"r1={cfg.get('r1')} r2={cfg.get('r2')} {s}"
    if cfg["type"] == "lora":
        name = "pissa" if cfg.get("init") == "pissa" else "rslora" if cfg.get("use_rslora") else "lora"
        return name, f"r={cfg.get('r')} {s}"
    return cfg["type"], f"r={cfg.get('r')} {s}"  # hira, dora, lora_pro


def _adapter_run(run_dir: Path, base: Path | None) -> RunReport:
    from abba_cli.run.adapter_files import read_run_adapter
    from abba_cli.run.latest import recorded_base

    start = time.perf_counter()
    adapter = read_run_adapter(run_dir)
    w0s = SafetensorsFolder(weights_folder(recorded_base(adapter.run_dir, adapter.base_model, base)))
    layers = []
    for module in sorted(adapter.factors, key=_layer_order):
        w0 = w0s.get(f"{module}.weight")
        if tuple(w0.shape) != adapter.out_in_features(module):
            raise UserError(
                f"{run_dir}: {module} is {tuple(w0.shape)} in the base but {adapter.out_in_features(module)} in "
                "the adapter: was it trained on another base? (--base PATH)"
            )
        layers.append(adapter_layer_stats(adapter.type, adapter.scaling, adapter.factors[module], w0, module))
        del w0  # one layer of W0 in memory at a time
    trainable = sum(
        t.numel() for f in adapter.factors.values() for k, t in f.items() if k not in ("A0", "B0")
    )
    method, settings = _adapter_method(adapter.config)
    seconds = time.perf_counter() - start
    return RunReport(run_dir, method, settings, trainable, layers, seconds, read_val_summary(adapter.root))


def _full_run(run_dir: Path, model_dir: Path, base: Path | None) -> RunReport:
    """dW = W_run - W0 for each linear weight the config's adapter.target_modules name (the layers an adapter
    run would have adapted, so the two are comparable)."""
    from abba_cli.adapters.inject import matches_target
    from abba_cli.run.layout import CONFIG_FILE, read_run_config

    start = time.perf_counter()
    cfg = read_run_config(run_dir)
    if cfg is None:
        raise UserError(f"{run_dir / CONFIG_FILE}: missing; a full fine-tuning run keeps its config there")
    base_name = str(base) if base is not None else cfg.model.name_or_path
    w0s, trained = SafetensorsFolder(weights_folder(base_name)), SafetensorsFolder(model_dir)
    keys = [
        k
        for k in trained.files
        if k.endswith(".weight")
        and matches_target(k.removesuffix(".weight"), cfg.adapter.target_modules)
        and len(trained.shape(k)) == 2
    ]
    if not keys:
        raise UserError(
            f"{model_dir}: no linear weight matches adapter.target_modules {cfg.adapter.target_modules}"
        )
    layers = []
    for key in sorted(keys, key=_layer_order):
        w, w0 = trained.get(key), w0s.get(key)
        if w.shape != w0.shape:
            raise UserError(f"{run_dir}: {key} is {tuple(w.shape)} but {tuple(w0.shape)} in base {base_name}")
        shape = (w.shape[0], w.shape[1])
        sv = dense_singular_values(w - w0)
        layers.append(
            _stats(key.removesuffix(".weight"), shape, min(shape), sv, float(torch.linalg.matrix_norm(w0)))
        )
        del w, w0
    trainable = sum(math.prod(trained.shape(k)) for k in trained.files)
    seconds = time.perf_counter() - start
    return RunReport(run_dir, "full", "every weight", trainable, layers, seconds, read_val_summary(run_dir))


def _layer_order(name: str) -> tuple[int, str]:
    m = _DEPTH.search(name + ".")
    return (int(m.group(1)) if m else -1, name)


def inspect_run(run: str | Path, base: Path | None = None) -> RunReport:
    """The spectra of one run's dW (an ABBA, LoRA or HiRA run, a checkpoint of one, or a full fine-tuning run)."""
    from abba_cli.run.layout import full_model_dir

    run_dir = Path(run)
    if not run_dir.is_dir():
        raise UserError(f"{run}: no such run directory")
    model_dir = full_model_dir(run_dir)
    return _full_run(run_dir, model_dir, base) if model_dir is not None else _adapter_run(run_dir, base)


def expand_runs(runs: list[Path]) -> list[Path]:
    """An `abba compare` folder (OUT, with OUT/runs/<method>_seed<k>/) stands for its finished runs."""
    from abba_cli.analysis.compare.folder import compare_runs
    from abba_cli.run.layout import has_final_output, is_run_dir

    out = []
    for run in runs:
        inner = [p for p in compare_runs(Path(run)) if has_final_output(p)]
        out += inner if inner and not is_run_dir(run) else [Path(run)]
    return out
