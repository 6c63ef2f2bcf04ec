"""`abba merge`: fold a run's adapter into its base model and write a plain Hugging Face model directory.

W' = W0 + dW is computed in fp32 one layer at a time (the model plus one layer's update in memory), each
adapter layer is replaced by an ordinary nn.Linear, and the result is saved with save_pretrained, so
`AutoModelForCausalLM.from_pretrained(OUT)` needs no abba-cli. Before the directory is published, a self-check
holds every folded layer to W0 + dW recomputed in fp32 and rounded once (bit for bit), reloads the directory from
disk, checks those layers came back byte-identical, and compares its logits with base + adapter (unmerged) on a
few fixed prompts.

A run trained on a quantized base (model.quantization) is folded into the unquantized base by default (`--onto
original`), or into the dequantized weights it trained against (`--onto dequantized`, merge_onto.py). Either way
the merged model's distances to what trained (the quantized base + adapter) and to the original base + adapter
are measured on the same prompts and recorded; onto a dequantized 4-bit base, the first is also checked.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abba_cli.errors import UserError
from abba_cli.run.adapter_files import RunAdapter, check_against_base, read_run_adapter
from abba_cli.run.latest import recorded_base
from abba_cli.ship.logit_check import CHECK_PROMPTS, compare_logits, prompt_logits
from abba_cli.ship.run_base import run_load_settings, run_quantization
from abba_cli.util.files import check_not_inside, check_output_dir

if TYPE_CHECKING:
    import torch

METADATA = "abba_merge.json"
# The hub's customary shard size: small enough for any loader to stream, large enough to keep file counts low.
MAX_SHARD_SIZE = "5GB"
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
# Self-check tolerance on max|merged - unmerged| / max|unmerged| over the check prompts' logits. Both sides compute
# in fp32, so what is left is the rounding of W0 + dW to the output dtype (measured sizes: RESULTS.md, "Merge
# self-check tolerances"). In bf16/fp16 that rounding can exceed one layer's whole update, so every folded layer
# is also checked bit for bit against round(W0 + dW), and the logits guard the rest of the model: within TOLERANCE
# or within half the adapter's own effect.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


def parse_dtype(dtype: str | None) -> str | None:
    """'bf16' | 'fp16' | 'fp32' (long torch names accepted), None for the base's own dtype."""
    if dtype is None:
        return None
    key = dtype.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DTYPE_NAMES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
    return key


def _adapted_reference(base: str, run_dir: Path, settings: dict[str, Any], quant: dict[str, Any]) -> list:
    """Logits of the base (quantized as `quant` says; {}: unquantized) + the adapter (unmerged), on CHECK_PROMPTS.

    Computed in fp32 (bitsandbytes' compute dtype fp32 too), so the difference to the merged model is the
    quantization of W0 alone, not a compute dtype's rounding. Freed before the merge's own base loads.
    """
    from abba_cli.adapters import load_adapter
    from abba_cli.models.loading import load_base
    from abba_cli.ship.merge_onto import packed_layers_as_trained

    model, tokenizer = load_base(base, "float32", **settings, **quant)
    model.eval()
    load_adapter(model, run_dir)
    model.eval()
    packed_layers_as_trained(model)
    try:
        return prompt_logits(model, tokenizer, CHECK_PROMPTS)
    finally:
        del model
        gc.collect()


def _short_dtype(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _ALIASES:
        raise UserError(f"the base model's weights are {name}; merge supports {', '.join(DTYPE_NAMES)} only")
    return _ALIASES[name]


def _weight_digest(weight: torch.Tensor) -> str:
    """Digest of a weight's bytes (dtype and shape included), to tell the written layer from the one read back."""
    import hashlib

    import torch

    w = weight.detach().contiguous().cpu()
    h = hashlib.blake2b(f"{w.dtype}{tuple(w.shape)}".encode(), digest_size=16)
    h.update(w.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fold_layers(model, target: torch.dtype) -> dict[str, str]:
    """Replace every adapter layer by an nn.Linear holding W0 + dW (fp32 sum, then cast to `target`); returns each
    layer's weight digest. Raises UserError if a folded weight is not round(W0 + dW) recomputed on its own.

    One layer at a time, so beyond the model only one layer's fp32 weight and dW are alive; each is folded on
    the fold device (this process's GPU when there is one) and its result brought back beside the others.
    """
    import torch
    from tqdm.auto import tqdm

    from abba_cli.adapters import adapter_layers
    from abba_cli.adapters.fold import fold_device

    device = fold_device()

    # Names only: holding the layer objects would keep every upcast fp32 weight alive until the end.
    names = [name for name, _ in adapter_layers(model)]
    digests = {}
    for name in tqdm(names, desc="merge", unit="layer", disable=None):
        layer = model.get_submodule(name)
        home = layer.weight.device
        with torch.no_grad():
            layer.to(device)
            # Upcast first so the layer's own fp32 fold is not rounded to a narrower base dtype on the way.
            layer.weight.data = layer.weight.data.float()
            # Recomputed here, before merge() and apart from its merged flag, so a fold that skipped or
            # mis-applied the update is caught (one more fp32 dW per layer: the price of an independent check).
            want = (layer.weight.data + layer.delta_weight()).to(target)
            layer.merge()
            linear = layer.to_linear().to(target)
            if not torch.equal(linear.weight, want):
                bad = int((linear.weight != want).sum())
                raise UserError(
                    f"merge self-check failed: merged layer {name} is not W0 + dW rounded to {target} "
                    f"({bad} of {want.numel()} weights differ); nothing was written"
                )
            digests[name] = _weight_digest(linear.weight)
        model.set_submodule(name, linear.to(home))
        del layer, linear, want
    return digests


def _layer_check(model, digests: dict[str, str]) -> dict[str, Any]:
    """Which folded layers, read back from disk, do not hold the bytes that were written."""
    changed = [name for name, d in digests.items() if _weight_digest(model.get_submodule(name).weight) != d]
    return {
        "layers_checked": len(digests),
        "layers_changed_on_disk": changed[:5],
        "layers_match": not changed,
    }


@dataclass
class _Timer:
    """Seconds per phase of a merge, recorded in its metadata."""

    started: float = field(default_factory=time.perf_counter)
    laps: dict[str, float] = field(default_factory=dict)

    def lap(self, phase: str) -> None:
        self.laps[phase] = round(time.perf_counter() - self.started - sum(self.laps.values()), 2)

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 2)


@dataclass
class _References:
    """Logits the merged model is held to: base + adapter unmerged (`adapter`), and how much the adapter moves
    the base's (`effect`); for a quantized-base run, the logits of what trained (the quantized base + adapter)
    and of the original base + adapter, which the merged model's distances are measured to."""

    adapter: list
    effect: float
    base_keys: set[str]  # the base's state-dict keys: the merged model must have exactly these
    quant: dict[str, Any] | None = None  # {quantization, double_quant} of a quantized-base run
    trained: list | None = None
    original: list | None = None


def merge_run(
    out: str | Path,
    run: str | Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    base: str | Path | None = None,
    onto: str = "original",
) -> dict[str, Any]:
    """Merge RUN_DIR's adapter into its base (or `base`, another copy of it) and write a Hugging Face model to
    OUT; returns the metadata. `onto` (merge_onto.ONTO): a quantized-base run's original or dequantized base."""
    target_name = parse_dtype(dtype)
    shown_out = Path(out)
    out = check_output_dir(shown_out, overwrite=overwrite)
    adapter = read_run_adapter(run)
    base = recorded_base(adapter.run_dir, adapter.base_model, base)
    protected = [Path(base).expanduser()] if Path(base).expanduser().is_dir() else []
    check_not_inside(out, protected, runs=[adapter.root])
    from abba_cli.ship.merge_onto import check_onto, onto_record

    quant = run_quantization(adapter.root)
    onto = check_onto(onto, quant and quant["quantization"], adapter.run_dir)

    import torch

    from abba_cli.util.files import atomic_directory, atomic_write_json

    timer = _Timer()
    model, tokenizer, refs = _load_with_references(adapter, base, timer, onto)
    base_name = _short_dtype(model.dtype)
    target_name = target_name or base_name
    digests = _fold(model, getattr(torch, DTYPE_NAMES[target_name]), refs.base_keys)
    timer.lap("fold")
    tol = TOLERANCE[target_name]
    # fp32: the logits are the whole check; bf16/fp16: within tol or half the adapter's effect (comment above)
    logits_bound = tol if target_name == "fp32" else max(tol, 0.5 * refs.effect)
    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        tokenizer.save_pretrained(tmp)
        timer.lap("save")
        # Free the in-memory copy before reloading: at most one copy of the model at a time.
        del model
        gc.collect()
        check, merged_logits = _check_saved(tmp, tokenizer, refs.adapter, digests)
        onto_meta = {}
        if refs.quant is not None:  # the distances to what trained and to the original base + adapter
            to_trained = compare_logits(refs.trained, merged_logits)
            to_original = compare_logits(refs.original, merged_logits)
            onto_meta = onto_record(onto, refs.quant, to_trained, to_original, logits_bound)
        del merged_logits
        timer.lap("reload_and_check")
        check |= {
            "prompts": list(CHECK_PROMPTS),
            "tolerance_rel": logits_bound,
            "adapter_effect_rel": refs.effect,
            "passed": check["max_rel_diff"] <= logits_bound and check["layers_match"],
        }
        meta = {
            "run": str(adapter.run_dir.resolve()),
            "base_model": base,
            "adapter_type": adapter.type,
            "scaling": adapter.scaling,
            "layers_merged": len(digests),
            "base_dtype": base_name,
            "dtype": target_name,
            "onto": onto,
            **onto_meta,
            "check": check,
            "seconds": timer.seconds,
            "timings_s": timer.laps,
        }
        _report(meta, shown_out)
        atomic_write_json(tmp / METADATA, meta)
    print(
        f"merged {len(digests)} layers of {adapter.run_dir} into {base} -> {shown_out} "
        f"({target_name}, {meta['seconds']} s)"
    )
    return meta


def _load_with_references(
    adapter: RunAdapter, base: str, timer: _Timer, onto: str
) -> tuple[Any, Any, _References]:
    """The base (its own dtype; `onto` dequantized: the weights a quantized-base run trained against) with the
    run's adapter loaded, its tokenizer carrying the run's chat template, and the reference logits: base alone,
    base + adapter, and for a quantized-base run the quantized and the original base + adapter."""
    from abba_cli.adapters import load_adapter
    from abba_cli.data.training_set import run_dir_chat_template
    from abba_cli.models.loading import load_base
    from abba_cli.ship.merge_onto import load_dequantized_base

    settings = run_load_settings(adapter.root)
    # Trained on a quantized base: measure what trained (and, onto the dequantized base, the original base +
    # adapter) before the merge's own base loads (one model in memory at a time).
    quant = run_quantization(adapter.root)
    trained = original = None
    if quant is not None:
        trained = _adapted_reference(base, adapter.run_dir, settings, quant)
        if onto == "dequantized":
            original = _adapted_reference(base, adapter.run_dir, settings, {})
        timer.lap("quantized_reference")
    if onto == "dequantized":
        model, tokenizer = load_dequantized_base(base, settings, quant)
    else:
        model, tokenizer = load_base(base, "auto", **settings)
    # adapter.root: a checkpoint holds no config.yaml, its run does
    if (template := run_dir_chat_template(adapter.root, tokenizer, base)) is not None:
        tokenizer.chat_template = template
    model.eval()
    check_against_base(adapter, model, base)
    adapter.factors.clear()  # only the shapes were needed; load_adapter reads the weights itself
    base_keys = set(model.state_dict())
    timer.lap("load_base")

    base_logits = prompt_logits(model, tokenizer, CHECK_PROMPTS)
    load_adapter(model, adapter.run_dir)
    model.eval()  # the adapter layers follow it anyway; dropout must be off in the reference
    ref_logits = prompt_logits(model, tokenizer, CHECK_PROMPTS)
    effect = compare_logits(ref_logits, base_logits)["max_rel_diff"]
    timer.lap("reference_logits")
    # Onto the original base, the self-check's reference is the original base + adapter.
    original = ref_logits if original is None else original
    return model, tokenizer, _References(ref_logits, effect, base_keys, quant, trained, original)


def _fold(model, target: torch.dtype, base_keys: set[str]) -> dict[str, str]:
    """Fold every adapter layer (self-checked, `fold_layers`) and cast the model to `target`; the state-dict
    keys must be the base's own, so the folder loads as a plain model."""
    digests = fold_layers(model, target)
    model.to(target)
    model.config.dtype = target
    keys = set(model.state_dict())
    if keys != base_keys:
        extra, missing = sorted(keys - base_keys)[:3], sorted(base_keys - keys)[:3]
        raise RuntimeError(f"merged model's keys differ from the base's: extra {extra}, missing {missing}")
    return digests


def _report(meta: dict[str, Any], shown_out: Path) -> None:
    """Print the self-check's verdict and notes; UserError (nothing published) when it failed."""
    from abba_cli.ship.merge_onto import report_onto

    c, target_name, n_layers = meta["check"], meta["dtype"], meta["layers_merged"]
    logits_ok = c["max_rel_diff"] <= c["tolerance_rel"]
    verdict = "passed" if c["passed"] else "FAILED"
    print(
        f"self-check {verdict}: merged ({target_name}) vs base + adapter ({meta['base_dtype']}"
        f"{', dequantized' if meta['onto'] == 'dequantized' else ''}) logits on "
        f"{len(CHECK_PROMPTS)} prompts: max abs diff {c['max_abs_diff']:.3g}, "
        f"relative {c['max_rel_diff']:.3g} (tolerance {c['tolerance_rel']:.3g}), top-1 agreement "
        f"{c['top1_agreement']:.1%}; all {n_layers} folded layers exactly round(W0 + dW)"
        + ("" if c["layers_match"] else ", but not as read back")
    )
    if "trained_on_quantized_base" in meta:
        report_onto(meta["onto"], meta, target_name, shown_out)
    if c["adapter_effect_rel"] <= TOLERANCE[target_name]:
        print(
            f"note: the adapter changes the logits by only {c['adapter_effect_rel']:.3g} (relative), within the "
            "tolerance, so this check cannot tell a merged model from the base (an untrained adapter?)"
        )
    if not c["layers_match"]:
        raise UserError(
            f"merge self-check failed: read back from disk, layer {c['layers_changed_on_disk'][0]} does not "
            f"hold the weights that were written; nothing was written to {shown_out}"
        )
    if not logits_ok:
        raise UserError(
            "merge self-check failed: merged logits differ from base + adapter by "
            f"{c['max_rel_diff']:.3g} (relative), above the {target_name} tolerance {c['tolerance_rel']:.3g}; "
            f"nothing was written to {shown_out}" + ("; try --dtype fp32" if target_name != "fp32" else "")
        )


def _check_saved(
    path: Path, tokenizer, ref_logits: list[torch.Tensor], digests: dict[str, str]
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Reload the written directory with plain transformers, as a user would; compare its logits and each folded
    layer (`_layer_check`). Returns the check and the reloaded model's logits."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    merged.eval()
    try:
        layers = _layer_check(merged, digests)
        got = prompt_logits(merged, tokenizer, CHECK_PROMPTS)
        return {**compare_logits(ref_logits, got), **layers}, got
    finally:
        del merged
        gc.collect()
