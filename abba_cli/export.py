"""`abba export`: write a run's adapter in another tool's format.

peft-lora: by the Khatri-Rao identity (ARCHITECTURE.md section 1)

    (B1 @ A1) * (B2 @ A2) = (B1 ⊙r B2) @ (A1ᵀ ⊙r A2ᵀ)ᵀ        B* (m, r1*r2), A* (r1*r2, n)

an ABBA adapter is exactly a LoRA adapter of rank r1*r2, so PEFT, vLLM and other LoRA servers can load it
without knowing about ABBA. LoRA runs export as they are. HiRA cannot be exported: its update s * W0 * (B@A)
depends on W0 and is not low-rank in general.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from abba_cli.errors import UserError
from abba_cli.runs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, resolve_run

if TYPE_CHECKING:
    import torch

FORMATS = ("peft-lora",)
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
# PEFT prefixes every module path of a PeftModelForCausalLM with this when it saves an adapter.
PEFT_PREFIX = "base_model.model."
FACTORS = {"abba": ("B1", "A1", "B2", "A2"), "lora": ("A", "B"), "hira": ("A", "B")}
# PiSSA-initialised LoRA runs also store the initial factors: the update to the original W0 is s(BA - B0A0).
OPTIONAL_FACTORS = {"lora": ("A0", "B0")}


@dataclass
class RunAdapter:
    """A run's adapter as stored on disk: its config and its fp32 factors grouped by module path."""

    run_dir: Path
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from abba_cli.adapters import read_adapter_config

    run_dir = resolve_run(run)
    cfg = read_adapter_config(run_dir)
    kind = cfg.get("type")
    if kind not in FACTORS:
        raise UserError(f"{run_dir / ADAPTER_CONFIG}: type {kind!r} is not one of {', '.join(FACTORS)}")
    scaling = cfg.get("scaling")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise UserError(f"{run_dir / ADAPTER_CONFIG}: 'scaling' must be the numeric scale s, got {scaling!r}")
    try:
        tensors = load_file(str(run_dir / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(
            f"{run_dir / ADAPTER_WEIGHTS}: unreadable or corrupt safetensors file ({e})"
        ) from None
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, name = key.rpartition(".")
        allowed = FACTORS[kind] + OPTIONAL_FACTORS.get(kind, ())
        if name not in allowed or not module:
            raise UserError(
                f"{run_dir / ADAPTER_WEIGHTS}: unexpected tensor {key!r}; a {kind} adapter stores "
                f"'<module>.{{{','.join(allowed)}}}'"
            )
        if not torch.isfinite(t).all():
            raise UserError(
                f"{run_dir / ADAPTER_WEIGHTS}: {key} holds NaN or infinite values (the run diverged?); "
                "nothing was written; use an earlier checkpoint (--run RUN_DIR/checkpoints/step-N)"
            )
        factors.setdefault(module, {})[name] = t.float()
    if not factors:
        raise UserError(f"{run_dir / ADAPTER_WEIGHTS}: holds no adapter tensors")
    for module, f in factors.items():
        missing = [n for n in FACTORS[kind] if n not in f]
        if ("A0" in f) != ("B0" in f):
            missing.append("B0" if "A0" in f else "A0")
        if missing:
            raise UserError(f"{run_dir / ADAPTER_WEIGHTS}: {module} lacks {', '.join(missing)}")
        _check_factor_shapes(run_dir, kind, module, f)
    return RunAdapter(run_dir, cfg, kind, float(scaling), str(cfg.get("base_model") or ""), factors)


def _check_factor_shapes(run_dir: Path, kind: str, module: str, f: dict[str, torch.Tensor]) -> None:
    where = f"{run_dir / ADAPTER_WEIGHTS}: {module}"
    shapes = {k: tuple(v.shape) for k, v in f.items()}
    if any(len(s) != 2 for s in shapes.values()):
        raise UserError(f"{where}: factors must be matrices, got {shapes}")
    if kind == "abba":
        (m1, r1), (r1b, n1), (m2, r2), (r2b, n2) = (shapes[k] for k in ("B1", "A1", "B2", "A2"))
        ok = m1 == m2 and n1 == n2 and r1 == r1b and r2 == r2b
    else:
        ok = shapes["A"][0] == shapes["B"][1]
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


def peft_alpha(scaling: float, r: int) -> tuple[float, float]:
    """(lora_alpha, factor to fold into B) so that PEFT's lora_alpha / r times the factor is exactly s.

    lora_alpha = s * r usually divides back to s bit for bit; when float rounding prevents that, the scale is
    folded into B instead and lora_alpha = r (PEFT scaling exactly 1).
    """
    alpha = scaling * r
    if alpha / r == scaling:
        return alpha, 1.0
    return float(r), scaling


def _peft_target_modules(modules: list[str], base_linear_names: list[str] | None) -> list[str]:
    """Short names (q_proj) when PEFT's suffix matching selects exactly the adapted modules, else full paths.

    LoRA servers such as vLLM expect the short form; the full form is the safe fallback when the base is
    not available to check the match, or when a short name would also select modules that were not adapted.
    """
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if base_linear_names is not None:
        matched = {n for n in base_linear_names if n.rsplit(".", 1)[-1] in leaves}
        if matched == set(modules):
            return leaves
    return sorted(modules)


def _meta_base(base: str) -> tuple[torch.nn.Module, list[str]] | None:
    """The base model on the meta device (config only, no weights read) and the names of its linear layers.

    None when the base cannot be found: the export itself does not need it, only the shape and
    target-module checks do.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not base:
        return None
    from abba_cli.models import SMOLLM2_ID, bundled_smollm2_dir

    try:
        # Offline, the bundled SmolLM2 stands in for its hub id, as it did when the run was trained.
        try:
            config = AutoConfig.from_pretrained(base)
        except OSError:
            if base != SMOLLM2_ID:
                raise
            config = AutoConfig.from_pretrained(bundled_smollm2_dir())
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - any failure only means we cannot check; say so and go on
        print(
            f"note: could not read base model {base!r} ({type(e).__name__}); skipping the shape check",
            file=sys.stderr,
        )
        return None
    return model, [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def export_run(format: str, out: str | Path, run: str | Path | None = None, overwrite: bool = False) -> Path:
    """Export RUN_DIR's adapter to OUT in `format`; returns OUT. UserError for bad input."""
    if format not in FORMATS:
        raise UserError(f"--format {format!r}: unknown export format; valid formats: {', '.join(FORMATS)}")
    out = Path(out)
    check_output_dir(out, overwrite)
    adapter = read_run_adapter(run)
    if adapter.type == "hira":
        raise UserError(
            f"{adapter.run_dir}: a HiRA adapter cannot be exported as LoRA: its update s * W0 * (B@A) "
            "depends on the base weight W0 and is not low-rank; use `abba merge` to ship a merged model"
        )
    check_not_inside(out, [adapter.run_dir])
    return _export_peft_lora(adapter, out, overwrite)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty OUT (or a file) unless asked to overwrite; cheap, so it runs before any work."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out}: directory exists and is not empty; pass --overwrite to replace it")
    # The output is created next to OUT, so its nearest existing ancestor must be a writable directory;
    # finding out here, not halfway through the write, keeps the error one line and the disk untouched.
    parent = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is not a directory; choose an --out under a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {parent} is not writable; choose a writable --out directory")


def check_not_inside(out: Path, protected: list[Path]) -> None:
    """Replacing OUT must never delete the run or the base model: refuse OUT equal to or containing them."""
    o = out.resolve()
    for p in protected:
        p = Path(p).resolve()
        if o == p or o in p.parents:
            raise UserError(f"--out {out}: would replace {p}; choose another output directory")


def _export_peft_lora(adapter: RunAdapter, out: Path, overwrite: bool) -> Path:
    import torch
    from tqdm.auto import tqdm

    from abba_cli.adapters.abba import khatri_rao_factors
    from abba_cli.fsutil import atomic_directory, atomic_save_safetensors, atomic_write_json

    modules = sorted(adapter.factors)
    if adapter.type == "abba":
        r = int(adapter.factors[modules[0]]["A1"].shape[0] * adapter.factors[modules[0]]["A2"].shape[0])
    else:
        first = adapter.factors[modules[0]]
        r = int(first["A"].shape[0]) * (2 if "A0" in first else 1)
    alpha, fold = peft_alpha(adapter.scaling, r)

    meta = _meta_base(adapter.base_model)
    linear_names = None
    if meta is not None:
        base_model, linear_names = meta
        check_against_base(adapter, base_model, adapter.base_model)

    tensors: dict[str, torch.Tensor] = {}
    abba_params = 0
    max_rel_err = 0.0
    for module in tqdm(modules, desc="export", unit="layer", disable=None):
        f = adapter.factors[module]
        if adapter.type == "abba":
            if f["A1"].shape[0] * f["A2"].shape[0] != r:
                raise UserError(
                    f"{adapter.run_dir}: {module}: ranks unlike the other layers; PEFT needs one r"
                )
            B, A = khatri_rao_factors(f["B1"], f["A1"], f["B2"], f["A2"])
            abba_params += sum(t.numel() for t in f.values())
            # Verify the identity on this layer in float64 (one m x n matrix at a time).
            ref = (f["B1"].double() @ f["A1"].double()) * (f["B2"].double() @ f["A2"].double())
            got = B.double() @ A.double()
            max_rel_err = max(max_rel_err, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
        else:
            if f["A"].shape[0] * (2 if "A0" in f else 1) != r:
                raise UserError(
                    f"{adapter.run_dir}: {module}: rank unlike the other layers; PEFT needs one r"
                )
            B, A = f["B"], f["A"]
            if "B0" in f:
                # PiSSA trained against W0 - s B0 A0; relative to W0 the update is s [B, -B0] [A; A0].
                B = torch.cat([B, -f["B0"]], dim=1)  # (m, 2r)
                A = torch.cat([A, f["A0"]], dim=0)  # (2r, n)
        if fold != 1.0:
            B = B * fold
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A.contiguous()  # (r, n)
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B.contiguous()  # (m, r)
    if max_rel_err > 1e-5:
        raise RuntimeError(f"Khatri-Rao export check failed: max relative error {max_rel_err:.2e}")

    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model or None,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": False,
        "target_modules": _peft_target_modules(modules, linear_names),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    with atomic_directory(out, overwrite=True) as tmp:
        atomic_save_safetensors(tensors, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        atomic_write_json(tmp / PEFT_CONFIG, peft_config)

    n_params = sum(t.numel() for t in tensors.values())
    size = (out / PEFT_WEIGHTS).stat().st_size
    line = (
        f"exported {len(modules)} layers as PEFT LoRA rank {r} (alpha {alpha:g}) to {out}: "
        f"{n_params:,} params, {_human_bytes(size)}"
    )
    if adapter.type == "abba":
        r1, r2 = f["A1"].shape[0], f["A2"].shape[0]
        line += (
            f" (the ABBA factors r1={r1}, r2={r2} hold {abba_params:,} params; a LoRA of rank r1*r2 holds "
            f"r1*r2*(m+n), {n_params / max(abba_params, 1):.1f}x as many)"
        )
    print(line)
    return out
