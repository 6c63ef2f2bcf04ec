"""`abba export`: write a run's adapter in another tool's format.

peft-lora: by the Khatri-Rao identity (ARCHITECTURE.md section 1)

    (B1 @ A1) * (B2 @ A2) = (B1 ⊙r B2) @ (A1ᵀ ⊙r A2ᵀ)ᵀ        B* (m, r1*r2), A* (r1*r2, n)

an ABBA adapter is exactly a LoRA adapter of rank r1*r2, so PEFT, vLLM and other LoRA servers can load it
without knowing about ABBA. LoRA runs export as they are. `--rank K` keeps each layer's best rank-K
approximation instead (truncate.py) and reports its error.
peft-loha: PEFT's LoHa is ABBA's own form, (alpha/r) (w1_a w1_b) ⊙ (w2_a w2_b): exact, no rank blow-up
(adapters/peft_format.py).
DoRA exports as PEFT LoRA with use_dora (its magnitude as `lora_magnitude_vector`), exactly; LoRA-Pro as LoRA.
HiRA cannot be exported: its update s * W0 * (B@A) depends on W0 and is not low-rank in general.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from abba_cli.adapters.peft_format import PEFT_PREFIX
from abba_cli.errors import UserError
from abba_cli.run.adapter_files import RunAdapter, check_against_base, read_run_adapter
from abba_cli.run.latest import recorded_base
from abba_cli.util.files import check_not_inside, check_output_dir

if TYPE_CHECKING:
    import torch

    from abba_cli.ship.export_tokenizer import ServedFormat

FORMATS = ("peft-lora", "peft-loha", "gguf")
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
# Written next to a truncated export: the per-layer errors and logit change that `--rank` printed.
TRUNCATION_REPORT = "abba_export.json"
# PEFT prefixes every module path of a PeftModelForCausalLM with this when it saves an adapter.
# The LoRA ranks vLLM's --max-lora-rank accepts (vllm/config/lora.py); its default is 16.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


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
    from abba_cli.models.bundled import bundled_stand_in

    try:
        # Offline, the bundled copy stands in for its hub id, as it did when the run was trained.
        try:
            config = AutoConfig.from_pretrained(base)
        except OSError as err:
            stand_in = bundled_stand_in(base, f"{base} is not readable ({type(err).__name__})")
            if stand_in is None:
                raise
            config = AutoConfig.from_pretrained(stand_in)
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


def export_run(
    format: str,
    out: str | Path,
    run: str | Path | None = None,
    overwrite: bool = False,
    base: str | Path | None = None,
    rank: int | None = None,
    dtype: str | None = None,
    onto: str | None = None,
) -> Path:
    """Export RUN_DIR's adapter to OUT in `format`; returns OUT. UserError for bad input.

    `base` points at another copy of the base model (for the shape check and the exported config); `rank`
    (peft-lora only) truncates each layer's update to its best rank-`rank` approximation (truncate.py). gguf: the
    merged model as one GGUF file at OUT in `dtype`, merged `onto` a quantized-base run's original or dequantized
    base (gguf_export.py)."""
    if format not in FORMATS:
        raise UserError(f"--format {format!r}: unknown export format; valid formats: {', '.join(FORMATS)}")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise UserError(f"--rank {rank!r}: must be a positive integer (the LoRA rank to truncate to)")
        if format != "peft-lora":
            raise UserError(f"--rank applies to --format peft-lora only; {format} exports are always exact")
    if format == "gguf":
        from abba_cli.ship.gguf_export import export_gguf

        export_gguf(out, run=run, dtype=dtype, overwrite=overwrite, base=base, onto=onto or "original")
        return Path(out)
    if dtype is not None:
        raise UserError(
            f"--dtype applies to --format gguf only (f16, bf16, q8_0); {format} keeps fp32 factors"
        )
    if onto is not None:
        raise UserError(
            f"--onto applies to --format gguf only (a merged model); {format} exports the adapter alone"
        )
    out = check_output_dir(Path(out), overwrite=overwrite)
    adapter = read_run_adapter(run)
    if base is not None:
        adapter.base_model = recorded_base(adapter.run_dir, adapter.base_model, base)
    if adapter.type == "hira":
        raise UserError(
            f"{adapter.run_dir}: a HiRA adapter cannot be exported as LoRA or LoHa (nor truncated): its update "
            "s * W0 * (B@A) depends on the base weight W0 and is not low-rank; use `abba merge` to ship a merged model"
        )
    if rank is not None and adapter.type == "dora":
        raise UserError(
            f"{adapter.run_dir}: --rank cannot truncate a DoRA adapter: its magnitude m was trained against the "
            "row norms of W0 + s B A, which a truncated B A changes; export it exactly (no --rank)"
        )
    if format == "peft-loha" and adapter.type != "abba":
        raise UserError(
            f"{adapter.run_dir}: a {adapter.type} adapter is already PEFT's native format: use --format peft-lora "
            "(LoHa is the form of ABBA adapters)"
        )
    check_not_inside(out, [], runs=[adapter.root])
    from abba_cli.ship.export_tokenizer import served_format

    served = served_format(adapter.root, adapter.base_model)
    if format == "peft-loha":
        _export_peft_loha(adapter, out, served)
    else:
        _export_peft_lora(adapter, out, served, rank)
    print(f"wrote {served.describe()} beside the adapter")
    return out


def _check_base(adapter: RunAdapter) -> list[str] | None:
    """Shape check against the base built on the meta device; its linear layer names (None: base unreadable)."""
    meta = _meta_base(adapter.base_model)
    if meta is None:
        return None
    base_model, linear_names = meta
    check_against_base(adapter, base_model, adapter.base_model)
    return linear_names


def _exact_lora_factors(adapter: RunAdapter) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, int]:
    """Each layer's exact LoRA factors (B (m, R), A (R, n)) without the scale; R; the ABBA factors' parameter
    count (0 for LoRA). The Khatri-Rao identity is checked on every layer in float64."""
    from tqdm.auto import tqdm

    from abba_cli.adapters.chain import chain_product, pairs_of
    from abba_cli.adapters.factors import thin_factors

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    abba_params = 0
    max_rel_err = 0.0
    for module in tqdm(sorted(adapter.factors), desc="export", unit="layer", disable=None):
        f = adapter.factors[module]
        B, A = thin_factors(adapter.type, f)
        if adapter.type == "abba":
            abba_params += sum(t.numel() for t in f.values())
            # Verify the identity on this layer in float64 (one m x n matrix at a time).
            ref = chain_product([(b.double(), a.double()) for b, a in pairs_of(f)])
            got = B.double() @ A.double()
            max_rel_err = max(max_rel_err, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
        pairs[module] = (B, A)
    ranks = {a.shape[0] for _, a in pairs.values()}
    if len(ranks) != 1:
        raise UserError(f"{adapter.run_dir}: layers have different ranks {sorted(ranks)}; PEFT needs one r")
    if max_rel_err > 1e-5:
        raise RuntimeError(f"Khatri-Rao export check failed: max relative error {max_rel_err:.2e}")
    return pairs, ranks.pop(), abba_params


def _truncate_all(
    adapter: RunAdapter, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], k: int
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """Every layer's best rank-k factors (fp32) and the error report: relative Frobenius error of dW (max and
    mean over layers) and, when the base model loads, the logit change on merge's check prompts."""
    from abba_cli.ship.run_base import run_load_settings
    from abba_cli.ship.truncate import logit_change, svd_truncate

    out, errors = {}, {}
    for module, (B, A) in pairs.items():
        t = svd_truncate(B, A, k)
        out[module] = (t.B.float(), t.A.float())
        errors[module] = t.rel_error
    worst = max(errors, key=errors.__getitem__)
    report: dict = {
        "rank": k,
        "exact_rank": next(iter(pairs.values()))[1].shape[0],
        "rel_frobenius_error_max": errors[worst],
        "rel_frobenius_error_max_layer": worst,
        "rel_frobenius_error_mean": sum(errors.values()) / len(errors),
        "rel_frobenius_error": errors,
    }
    print(
        f"truncated {len(errors)} layers from rank {report['exact_rank']} to {k}: relative Frobenius error of dW "
        f"max {errors[worst]:.4g} ({worst}), mean {report['rel_frobenius_error_mean']:.4g}"
    )
    try:
        logits = logit_change(
            adapter.base_model, adapter.run_dir, out, adapter.scaling, run_load_settings(adapter.root)
        )
    except UserError as e:  # the export itself needs no base: say why the logits are not measured and go on
        print(f"note: logit change not measured: {e}", file=sys.stderr)
        return out, report
    report["logits"] = logits
    print(
        f"logit change on {logits['prompts']} prompts vs the exact adapter: max abs {logits['max_abs_change']:.4g}, "
        f"{logits['change_vs_effect']:.3g} of the adapter's own effect (max abs {logits['adapter_effect']:.4g})"
    )
    return out, report


def _export_peft_lora(adapter: RunAdapter, out: Path, served: ServedFormat, rank: int | None = None) -> Path:

    from abba_cli.util.files import atomic_directory, atomic_save_safetensors, atomic_write_json

    modules = sorted(adapter.factors)
    linear_names = _check_base(adapter)
    pairs, exact_r, abba_params = _exact_lora_factors(adapter)
    report = None
    if rank is not None and rank >= exact_r:
        print(
            f"note: --rank {rank} >= the adapter's exact rank {exact_r}: exporting it exactly at rank {exact_r}"
        )
    elif rank is not None:
        pairs, report = _truncate_all(adapter, pairs, rank)
    r = rank if report is not None else exact_r
    alpha, fold = peft_alpha(adapter.scaling, r)

    tensors: dict[str, torch.Tensor] = {}
    for module, (B, A) in pairs.items():
        if fold != 1.0:
            B = B * fold
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A.contiguous()  # (r, n)
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B.contiguous()  # (m, r)
        if adapter.type == "dora":  # PEFT's row norm of W0 + (lora_alpha / r) B A is ours: fold included
            tensors[f"{PEFT_PREFIX}{module}.lora_magnitude_vector"] = adapter.factors[module][
                "m"
            ].contiguous()

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
        "use_dora": adapter.type == "dora",
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
        if report is not None:
            atomic_write_json(tmp / TRUNCATION_REPORT, {"run": str(adapter.run_dir.resolve()), **report})
        served.save(tmp)

    n_params = sum(t.numel() for t in tensors.values())
    size = (out / PEFT_WEIGHTS).stat().st_size
    line = (
        f"exported {len(modules)} layers as PEFT {'DoRA' if adapter.type == 'dora' else 'LoRA'} rank {r} "
        f"(alpha {alpha:g}) to {out}: "
        f"{n_params:,} params, {_human_bytes(size)}"
    )
    if adapter.type == "abba":
        from abba_cli.adapters.chain import pairs_of

        ranks = [a.shape[0] for _, a in pairs_of(adapter.factors[modules[0]])]
        kind = "truncated from" if report is not None else "a LoRA of"
        names = " ".join(f"r{i}={r}" for i, r in enumerate(ranks, 1))
        line += (
            f" (the ABBA factors {names} hold {abba_params:,} params; {kind} rank "
            f"{'*'.join(f'r{i}' for i in range(1, len(ranks) + 1))} = {math.prod(ranks)}: "
            f"{n_params / max(abba_params, 1):.1f}x as many)"
        )
    print(line)
    print(vllm_hint(r), file=sys.stderr if vllm_max_lora_rank(r) is None else sys.stdout)
    return out


def _export_peft_loha(adapter: RunAdapter, out: Path, served: ServedFormat) -> Path:
    """ABBA as PEFT LoHa: hada_w1_a = B1, hada_w1_b = A1, hada_w2_a = B2, hada_w2_b = A2 at one r = max(r1, r2),
    the smaller pair zero-padded (exact, peft_format.pad_rank); alpha / r = s (or s folded into w1_a)."""
    from abba_cli.adapters.peft_format import loha_config, loha_tensors
    from abba_cli.util.files import atomic_directory, atomic_save_safetensors, atomic_write_json

    modules = sorted(adapter.factors)
    if "B3" in adapter.factors[modules[0]]:
        k = sum(1 for n in adapter.factors[modules[0]] if n.startswith("B"))
        raise UserError(
            f"{adapter.run_dir}: a chain of {k} ABBA pairs has no LoHa form (LoHa holds two); export it "
            "exactly with --format peft-lora"
        )
    linear_names = _check_base(adapter)
    r = max(max(f["A1"].shape[0], f["A2"].shape[0]) for f in adapter.factors.values())
    alpha, fold = peft_alpha(adapter.scaling, r)
    tensors: dict[str, torch.Tensor] = {}
    worst = 0.0
    for module in modules:
        f = adapter.factors[module]
        t = loha_tensors(module, f, r, fold)
        tensors |= t
        # The padded product must be the ABBA product itself: checked per layer in float64.
        w = [
            t[f"{PEFT_PREFIX}{module}.{k}"].double()
            for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        ]
        ref = (f["B1"].double() @ f["A1"].double()) * (f["B2"].double() @ f["A2"].double()) * fold
        got = (w[0] @ w[1]) * (w[2] @ w[3])
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    if worst > 1e-5:
        raise RuntimeError(f"LoHa export check failed: max relative error {worst:.2e}")
    config = loha_config(adapter.base_model, r, alpha, _peft_target_modules(modules, linear_names))
    with atomic_directory(out, overwrite=True) as tmp:
        atomic_save_safetensors(tensors, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        atomic_write_json(tmp / PEFT_CONFIG, config)
        served.save(tmp)
    f = adapter.factors[modules[0]]
    r1, r2 = f["A1"].shape[0], f["A2"].shape[0]
    padded = "" if r1 == r2 else f", the rank-{min(r1, r2)} pair zero-padded to {r}"
    print(
        f"exported {len(modules)} layers as PEFT LoHa r={r} (alpha {alpha:g}{padded}) to {out}: "
        f"{sum(t.numel() for t in tensors.values()):,} params, {_human_bytes((out / PEFT_WEIGHTS).stat().st_size)}; "
        "load with peft.PeftModel.from_pretrained(base, OUT)"
    )
    return out


def vllm_max_lora_rank(r: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that serves rank r (None: vLLM cannot serve it)."""
    return next((v for v in VLLM_LORA_RANKS if v >= r), None)


def vllm_hint(r: int) -> str:
    need = vllm_max_lora_rank(r)
    if need is None:
        return (
            f"warning: LoRA rank {r} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]}): vLLM cannot "
            "serve this adapter; ship a merged model instead (abba merge)"
        )
    return f"to serve with vLLM: vllm serve BASE --enable-lora --max-lora-rank {need} (vLLM's default is 16)"
