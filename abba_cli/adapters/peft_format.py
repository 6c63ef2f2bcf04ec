"""PEFT's adapter folders (adapter_config.json with "peft_type" + adapter_model.safetensors), both ways.

Reading: a PEFT LoRA or LoHa folder becomes our own adapter config dict and `<module>.<factor>` tensors, so
`abba eval`, `abba merge` and `abba export` take adapters trained elsewhere. The math maps exactly:

    LoRA  dW = (lora_alpha / r) · lora_B @ lora_A               -> our LoRA: B = lora_B, A = lora_A
          (lora_alpha / sqrt(r) with use_rslora)
    LoHa  dW = (alpha / r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)      -> our ABBA, r1 = r2 = r, "released" scaling
                                                                   s = alpha / r: B1 = w1_a, A1 = w1_b, ...
    LoRA with use_dora: W' = m (W0 + s lora_B @ lora_A) / ||.||  -> our DoRA: m = lora_magnitude_vector

Writing: LoHa tensors and config for `abba export --format peft-loha` (the LoRA export lives in export.py).
Key names are the ones PEFT's own save_pretrained writes (checked against PEFT in tests/adapters/test_peft_format.py):
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, `base_model.model.<module>.hada_w1_a` (no
`.weight`). PEFT itself is not imported: it is a test dependency only.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from abba_cli.errors import UserError

PEFT_PREFIX = "base_model.model."
LORA_FACTORS = {"lora_A.weight": "A", "lora_B.weight": "B"}
DORA_FACTORS = {**LORA_FACTORS, "lora_magnitude_vector": "m"}
LOHA_FACTORS = {"hada_w1_a": "B1", "hada_w1_b": "A1", "hada_w2_a": "B2", "hada_w2_b": "A2"}
PEFT_TYPES = {"LORA": LORA_FACTORS, "LOHA": LOHA_FACTORS}
CONVERTED_FROM = "converted_from"  # key of our config dict that marks a converted PEFT folder


def is_peft_config(data: object) -> bool:
    return isinstance(data, dict) and "peft_type" in data


def _refuse_unsupported(data: dict, source: str) -> None:
    """Settings whose adapters our layers cannot reproduce exactly: one line naming the key."""
    kind = data.get("peft_type")
    if kind not in PEFT_TYPES:
        raise UserError(
            f"{source}: peft_type {kind!r} is not supported; abba-cli reads PEFT adapters of type "
            f"{' or '.join(PEFT_TYPES)}"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if data.get(key):
            raise UserError(
                f"{source}: {key} is set; only adapters with one rank and alpha for every layer are read"
            )
    if data.get("modules_to_save"):
        raise UserError(
            f"{source}: modules_to_save {data['modules_to_save']} holds fully trained modules that abba-cli "
            "adapters cannot carry; merge it with PEFT instead"
        )
    flags = {"fan_in_fan_out": True, "lora_bias": True}
    for key, bad in flags.items():
        if data.get(key) is bad:
            raise UserError(
                f"{source}: {key} is true; abba-cli reads LoRA and DoRA without a bias or Conv1D layout"
            )
    if data.get("bias", "none") != "none":
        raise UserError(
            f"{source}: bias {data['bias']!r}: trained biases are not carried; only bias 'none' is read"
        )
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "eva", "loftq")):
        # Saved without PEFT's conversion, such an adapter belongs to a modified base model, not to W0.
        raise UserError(
            f"{source}: init_lora_weights {init!r}: the adapter applies to PEFT's modified base weights; "
            "save it with path_initial_model_for_weight_conversion to get a plain LoRA"
        )
    if data.get("lora_alpha" if kind == "LORA" else "alpha") is None or not isinstance(data.get("r"), int):
        raise UserError(f"{source}: needs an integer 'r' and {'lora_alpha' if kind == 'LORA' else 'alpha'}")


def peft_scaling(data: dict) -> float:
    """The s PEFT applies: lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), LoHa alpha / r."""
    r = data["r"]
    if data["peft_type"] == "LORA":
        return data["lora_alpha"] / (math.sqrt(r) if data.get("use_rslora") else r)
    return data["alpha"] / r


def config_from_peft(data: dict, source: str) -> dict:
    """Our adapter_config.json content for a PEFT LoRA/LoHa config (UserError for what we cannot read)."""
    from abba_cli import __version__

    _refuse_unsupported(data, source)
    s, r = peft_scaling(data), data["r"]
    if data["peft_type"] == "LORA":
        kind = "dora" if data.get("use_dora") else "lora"
        ranks = {"type": kind, "r": r, "alpha": float(data["lora_alpha"])}
        convention, rslora = ("rslora" if data.get("use_rslora") else "alpha/r"), bool(data.get("use_rslora"))
    else:
        # Our "released" ABBA convention has s = alpha, so alpha = s reproduces PEFT's alpha / r.
        ranks = {"type": "abba", "r1": r, "r2": r, "alpha": s}
        convention, rslora = "released", False
    targets = data.get("target_modules")
    return {
        "format": "abba-cli-adapter",
        "abba_cli_version": __version__,
        CONVERTED_FROM: f"peft-{data['peft_type'].lower()}",
        **ranks,
        "scaling": s,
        "scaling_convention": convention,
        "dropout": 0.0,
        # Module paths are filled in from the tensors (to_our_tensors); the config's own list may be a regex.
        "target_modules": sorted(targets) if isinstance(targets, list) else [],
        "init": "default",
        "use_rslora": rslora,
        "path": "auto",
        "base_model": data.get("base_model_name_or_path") or "",
        "adapted_modules": None,
    }


def to_our_tensors(
    cfg: dict, tensors: dict[str, torch.Tensor], weights: Path | str
) -> dict[str, torch.Tensor]:
    """PEFT's tensors renamed to ours (`<module>.A`, `<module>.B1`, ...), shapes checked; our own files pass as
    they are. Also fills cfg["target_modules"]/["adapted_modules"] with the exact module paths, so injection
    adapts exactly the layers the file holds (PEFT's layers_to_transform may have left some out)."""
    kind = cfg.get(CONVERTED_FROM)
    if kind is None:
        return tensors
    names = LOHA_FACTORS if kind == "peft-loha" else DORA_FACTORS if cfg["type"] == "dora" else LORA_FACTORS
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        suffix = next((s for s in names if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(PEFT_PREFIX):
            raise UserError(
                f"{weights}: unexpected tensor {key!r} for a PEFT {kind.removeprefix('peft-')} adapter; expected "
                f"'{PEFT_PREFIX}<module>.{{{','.join(names)}}}'"
            )
        module = key[len(PEFT_PREFIX) : -len(suffix) - 1]
        out[f"{module}.{names[suffix]}"] = t.float()
    modules = sorted({k.rsplit(".", 1)[0] for k in out})
    if not modules:
        raise UserError(f"{weights}: holds no adapter tensors")
    for module in modules:
        _check_shapes(
            weights,
            module,
            {k.rsplit(".", 1)[1]: v for k, v in out.items() if k.startswith(module + ".")},
            cfg,
        )
    cfg["target_modules"] = modules
    cfg["adapted_modules"] = modules
    return out


def _check_shapes(weights: Path | str, module: str, f: dict[str, torch.Tensor], cfg: dict) -> None:
    pairs = (("B1", "A1"), ("B2", "A2")) if cfg["type"] == "abba" else (("B", "A"),)
    r = cfg["r1"] if cfg["type"] == "abba" else cfg["r"]
    needed = [n for p in pairs for n in p] + (["m"] if cfg["type"] == "dora" else [])
    missing = [n for n in needed if n not in f]
    if missing:
        raise UserError(f"{weights}: {module} lacks {', '.join(missing)}")
    shapes = {k: tuple(v.shape) for k, v in f.items()}
    if "m" in f and shapes["m"] != (f["B"].shape[0],):
        raise UserError(
            f"{weights}: {module}: lora_magnitude_vector {shapes['m']} does not fit {shapes['B']}"
        )
    ok = all(len(s) == 2 for k, s in shapes.items() if k != "m") and all(
        f[b].shape[1] == r and f[a].shape[0] == r for b, a in pairs
    )
    ok = ok and len({f[b].shape[0] for b, _ in pairs}) == 1 and len({f[a].shape[1] for _, a in pairs}) == 1
    if not ok:
        raise UserError(
            f"{weights}: {module}: factor shapes {shapes} do not fit rank r={r} of the adapter config"
        )


# -- writing LoHa -------------------------------------------------------------------------------------------


def pad_rank(t: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """`t` with zero columns (dim 1) or rows (dim 0) appended up to r. Zero columns of B meet zero rows of A, so
    B_pad @ A_pad = B @ A: every added term is 0 * 0, which leaves each sum exactly as it was."""
    extra = r - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def loha_tensors(module: str, f: dict[str, torch.Tensor], r: int, fold: float) -> dict[str, torch.Tensor]:
    """PEFT LoHa tensors of one ABBA layer at rank r (both pairs zero-padded to r); `fold` multiplies w1_a
    when PEFT's alpha / r cannot be exactly s."""
    w1a = pad_rank(f["B1"], r, 1)
    if fold != 1.0:
        w1a = w1a * fold
    tensors = {"hada_w1_a": w1a, "hada_w1_b": pad_rank(f["A1"], r, 0)}
    tensors |= {"hada_w2_a": pad_rank(f["B2"], r, 1), "hada_w2_b": pad_rank(f["A2"], r, 0)}
    return {f"{PEFT_PREFIX}{module}.{k}": v.contiguous() for k, v in tensors.items()}


def loha_config(base_model: str, r: int, alpha: float, target_modules: list[str]) -> dict:
    """adapter_config.json for PEFT LoHa, with the fields PEFT 0.21 writes; dropouts 0 (inference)."""
    return {
        "peft_type": "LOHA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": r,
        "alpha": alpha,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": False,
        "target_modules": target_modules,
        "exclude_modules": None,
        "init_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "revision": None,
    }
