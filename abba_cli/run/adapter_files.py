"""A run's adapter as stored on disk, read and checked without a model: its config and fp32 factors grouped
by module (merge and export work from these), and the check that they fit a base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from abba_cli.errors import UserError
from abba_cli.run.latest import resolve_run
from abba_cli.run.layout import read_adapter_tensors, run_files

if TYPE_CHECKING:
    import torch

FACTORS = {
    "abba": ("B1", "A1", "B2", "A2"),
    "lora": ("A", "B"),
    "hira": ("A", "B"),
    "dora": ("A", "B", "m"),  # m: DoRA's magnitude, one value per output row
    "lora_pro": ("A", "B"),
}
# PiSSA-initialised LoRA runs also store the initial factors: the update to the original W0 is s(BA - B0A0).
OPTIONAL_FACTORS = {"lora": ("A0", "B0")}


@dataclass
class RunAdapter:
    """A run's adapter as stored on disk: its config and its fp32 factors grouped by module path."""

    run_dir: Path  # as given: the run, or one of its checkpoints
    root: Path  # the run directory itself (config.yaml)
    weights: Path  # the safetensors file the factors came from
    config: dict
    type: str
    scaling: float
    base_model: str
    factors: dict[str, dict[str, torch.Tensor]]

    def out_in_features(self, module: str) -> tuple[int, int]:
        """(m, n) of the adapted layer, from B1/A1 (ABBA) or B/A (LoRA, HiRA)."""
        f = self.factors[module]
        b, a = (f["B1"], f["A1"]) if self.type == "abba" else (f["B"], f["A"])
        return b.shape[0], a.shape[1]


def read_run_adapter(run: str | Path | None) -> RunAdapter:
    """Read RUN_DIR/adapter_config.json and the factors; UserError for anything inconsistent."""
    import torch

    from abba_cli.adapters import read_adapter_config

    run_dir = resolve_run(run)
    files = run_files(run_dir)
    cfg = read_adapter_config(run_dir)
    kind = cfg.get("type")
    if kind not in FACTORS:
        raise UserError(f"{files.adapter_config}: type {kind!r} is not one of {', '.join(FACTORS)}")
    scaling = cfg.get("scaling")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise UserError(f"{files.adapter_config}: 'scaling' must be the numeric scale s, got {scaling!r}")
    tensors = read_adapter_tensors(files.weights)
    from abba_cli.adapters.peft_format import to_our_tensors

    tensors = to_our_tensors(cfg, tensors, files.weights)  # a PEFT LoRA/LoHa folder; ours pass unchanged
    factors: dict[str, dict[str, torch.Tensor]] = {}
    names = _factor_names(kind, cfg)
    for key, t in tensors.items():
        module, _, name = key.rpartition(".")
        allowed = names + OPTIONAL_FACTORS.get(kind, ())
        if name not in allowed or not module:
            raise UserError(
                f"{files.weights}: unexpected tensor {key!r}; a {kind} adapter stores "
                f"'<module>.{{{','.join(allowed)}}}'"
            )
        if not torch.isfinite(t).all():
            raise UserError(
                f"{files.weights}: {key} holds NaN or infinite values (the run diverged?); "
                "nothing was written; use an earlier checkpoint (--run RUN_DIR/checkpoints/step-N)"
            )
        factors.setdefault(module, {})[name] = t.float()
    if not factors:
        raise UserError(f"{files.weights}: holds no adapter tensors")
    for module, f in factors.items():
        missing = [n for n in names if n not in f]
        if ("A0" in f) != ("B0" in f):
            missing.append("B0" if "A0" in f else "A0")
        if missing:
            raise UserError(f"{files.weights}: {module} lacks {', '.join(missing)}")
        _check_factor_shapes(files.weights, kind, module, f)
    base = str(cfg.get("base_model") or "")
    return RunAdapter(run_dir, files.root, files.weights, cfg, kind, float(scaling), base, factors)


def _factor_names(kind: str, cfg: dict) -> tuple[str, ...]:
    """The factors a run of `kind` stores: ABBA's B1, A1, ..., BK, AK for its K pairs (adapter_config's ranks)."""
    ranks = cfg.get("ranks")
    if kind != "abba" or ranks is None:
        return FACTORS[kind]
    if not isinstance(ranks, list) or len(ranks) < 2:
        raise UserError(f"adapter_config.json: 'ranks' must list at least two ranks, got {ranks!r}")
    return tuple(name for i in range(1, len(ranks) + 1) for name in (f"B{i}", f"A{i}"))


def _check_factor_shapes(weights: Path, kind: str, module: str, f: dict[str, torch.Tensor]) -> None:
    where = f"{weights}: {module}"
    shapes = {k: tuple(v.shape) for k, v in f.items()}
    if any(len(s) != (1 if k == "m" else 2) for k, s in shapes.items()):
        raise UserError(f"{where}: factors must be matrices (DoRA's m a vector), got {shapes}")
    if kind == "abba":
        k = sum(1 for name in shapes if name.startswith("B"))
        pairs = [(shapes[f"B{i}"], shapes[f"A{i}"]) for i in range(1, k + 1)]
        ok = len({b[0] for b, _ in pairs}) == 1 and len({a[1] for _, a in pairs}) == 1
        ok = ok and all(b[1] == a[0] for b, a in pairs)
    else:
        ok = shapes["A"][0] == shapes["B"][1] and ("m" not in f or shapes["m"] == shapes["B"][:1])
    if not ok:
        raise UserError(f"{where}: inconsistent factor shapes {shapes}")


def check_against_base(adapter: RunAdapter, model, base: str) -> None:
    """Refuse an adapter trained on another base: every adapted module must exist with the same (m, n).

    Works on a real model or one built on the meta device (only shapes are read).
    """
    import torch

    for module in adapter.factors:
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise UserError(
                f"the adapter in {adapter.run_dir} adapts {module}, which base model {base} does not have: "
                "was it trained on another base?"
            ) from None
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise UserError(f"base model {base}: {module} is not a linear layer, but the adapter adapts it")
        m, n = adapter.out_in_features(module)
        if tuple(weight.shape) != (m, n):
            raise UserError(
                f"the adapter in {adapter.run_dir} does not fit base model {base}: {module} is "
                f"{tuple(weight.shape)} (out, in) in the base but {(m, n)} in the adapter; "
                "was it trained on another base?"
            )
