"""`abba merge`: fold a run's adapter into its base model and write a plain Hugging Face model directory.

W' = W0 + dW is computed in fp32 one layer at a time (the model plus one layer's update in memory), each
adapter layer is replaced by an ordinary nn.Linear, and the result is saved with save_pretrained, so
`AutoModelForCausalLM.from_pretrained(OUT)` needs no abba-cli. Before the directory is published, a self-check
holds every folded layer to W0 + dW recomputed in fp32 and rounded once (bit for bit), reloads the directory from
disk, checks those layers came back byte-identical, and compares its logits with base + adapter (unmerged) on a
few fixed prompts.

A run trained on a quantized base (model.quantization) is folded into the unquantized base all the same: the
merged model is the bf16/fp32 base + dW, what users ship. How far that is from what trained (the quantized base
+ adapter) is measured on the same prompts and recorded as `trained_on_quantized_base`, not checked.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abba_cli.errors import UserError
from abba_cli.fsutil import check_not_inside, check_output_dir
from abba_cli.run.adapter_files import check_against_base, read_run_adapter
from abba_cli.run.latest import recorded_base

if TYPE_CHECKING:
    import torch

METADATA = "abba_merge.json"
# The hub's customary shard size: small enough for any loader to stream, large enough to keep file counts low.
MAX_SHARD_SIZE = "5GB"
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
# Self-check tolerance on max|merged - unmerged| / max|unmerged| over the check prompts' logits. Both sides run
# in fp32 compute (fp32_compute), so the only difference left is the rounding of W0 + dW to the output dtype;
# measured: bf16 0.7% (SmolLM2-135M) to 2.3% (tiny random test model, small logits), fp16 0.13% (SmolLM2),
# fp32 4e-6. A missing update shows as the adapter's whole effect, which is reported next to the tolerance.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
# In bf16 and fp16 the logits alone cannot judge a merge of a trained adapter: rounding W0 + dW moves a trained
# SmolLM2 adapter's logits 9.4% (relative), past TOLERANCE["bf16"], while one layer's update is 0.2-0.7% of that
# layer's output (200 of its 210 layers below 1.6%), so a missing one hides in the rounding. So every folded
# layer is also checked exactly: its weight must be W0 + dW computed afresh in fp32 and rounded once to the
# output dtype, bit for bit, and the directory read back must hold those same bytes. The logits then guard the
# rest of the model (embeddings, norms, config): in bf16/fp16 they pass within TOLERANCE or within half the
# adapter's own effect (the merged model at least twice as close to base + adapter as the base is).
CHECK_PROMPTS = (
    "Below is an instruction that describes a task. Write a response that completes the request.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "The answer is: 42",
)


def parse_dtype(dtype: str | None) -> str | None:
    """'bf16' | 'fp16' | 'fp32' (long torch names accepted), None for the base's own dtype."""
    if dtype is None:
        return None
    key = dtype.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DTYPE_NAMES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
    return key


def _short_dtype(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _ALIASES:
        raise UserError(f"the base model's weights are {name}; merge supports {', '.join(DTYPE_NAMES)} only")
    return _ALIASES[name]


def _run_model_config(run_dir: Path) -> Any | None:
    """The run's `model:` section (run/layout's reader), or None when the run has no readable config.yaml: merge
    then loads the base with the defaults."""
    from abba_cli.run.layout import read_run_config

    try:
        cfg = read_run_config(run_dir)
    except UserError:
        return None
    return None if cfg is None else cfg.model


def _run_model_settings(run_dir: Path) -> dict[str, Any]:
    """trust_remote_code / revision as the run loaded its base (models.load_kwargs), so the base loads as it did
    for training. Not its dtype (merge loads the checkpoint's own and picks the output's itself), its attention
    kernel (irrelevant to the weights, and maybe unavailable here) nor its quantization (merge folds into the
    unquantized base)."""
    from abba_cli.models import load_kwargs

    model = _run_model_config(run_dir)
    if model is None:
        return {}
    return {k: v for k, v in load_kwargs(model).items() if k in ("trust_remote_code", "revision")}


def _run_quantization(run_dir: Path) -> dict[str, Any] | None:
    """{quantization, double_quant} when the run trained on a bitsandbytes-quantized base, else None."""
    model = _run_model_config(run_dir)
    if model is None or model.quantization == "none":
        return None
    return {"quantization": model.quantization, "double_quant": model.double_quant}


def _quantized_reference(base: str, run_dir: Path, settings: dict[str, Any], quant: dict[str, Any]) -> list:
    """Logits of what the run trained: the quantized base + the adapter (unmerged), on CHECK_PROMPTS.

    Computed in fp32 (bitsandbytes' compute dtype fp32 too), so the difference to the merged model is the
    quantization of W0 alone, not a compute dtype's rounding. Freed before the unquantized base loads.
    """
    from abba_cli.adapters import load_adapter
    from abba_cli.models import load_base

    model, tokenizer = load_base(base, "float32", **settings, **quant)
    model.eval()
    load_adapter(model, run_dir)
    model.eval()
    try:
        return _logits(model, tokenizer, CHECK_PROMPTS)
    finally:
        del model
        gc.collect()


@contextlib.contextmanager
def fp32_compute(model) -> Iterator[None]:
    """Run forward passes in fp32 while the weights stay stored in their own dtype.

    Each module's own parameters are upcast just for its forward and put back afterwards (exactly: the values
    came from that dtype), so the extra memory is one module's weights in fp32, not an fp32 copy of the model.
    The self-check needs this: in bf16 the forward pass's own rounding (a few % of the logits over 30 layers
    of SmolLM2) would hide whether the merge is right; in fp32 what remains is the rounding of W0 + dW.
    """
    import torch

    def upcast(module, args):
        for p in module.parameters(recurse=False):
            # Packed bitsandbytes weights (uint8/int8) compute in their own dtype; they are never upcast.
            if p.dtype != torch.float32 and p.is_floating_point():
                module._abba_dtypes = getattr(module, "_abba_dtypes", {})
                module._abba_dtypes[id(p)] = p.dtype
                p.data = p.data.float()

    def restore(module, args, output):
        saved = getattr(module, "_abba_dtypes", None)
        if saved:
            for p in module.parameters(recurse=False):
                if id(p) in saved:
                    p.data = p.data.to(saved[id(p)])
            del module._abba_dtypes

    handles = []
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(upcast))
            handles.append(module.register_forward_hook(restore))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module in model.modules():  # an exception mid-forward may leave a module upcast
            restore(module, None, None)


def _logits(model, tokenizer, prompts: tuple[str, ...]) -> list[torch.Tensor]:
    """Per-prompt fp32 logits (tokens, vocab), computed in fp32 in one right-padded batch.

    One batch, because each forward under fp32_compute pays for casting every weight; right padding, so the
    real tokens' logits do not depend on the pad tokens (causal attention, positions from 0).
    """
    import torch

    device = next(model.parameters()).device
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="right").to(device)
    with torch.inference_mode(), fp32_compute(model):
        logits = model(**batch).logits.float().cpu()  # (prompts, tokens, vocab)
    mask = batch["attention_mask"].bool().cpu()
    return [logits[i][mask[i]] for i in range(len(prompts))]


def compare_logits(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
    """Max abs diff, that diff relative to the reference logits' scale (max |logit|), top-1 agreement."""
    import torch

    max_abs = max(float((a - b).abs().max()) for a, b in zip(ref, got, strict=True))
    scale = max(float(a.abs().max()) for a in ref)
    agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(ref, got, strict=True)])
    return {
        "max_abs_diff": max_abs,
        "max_rel_diff": max_abs / max(scale, 1e-12),
        "logit_scale": scale,
        "top1_agreement": float(agree.mean()),
    }


def _weight_digest(weight: torch.Tensor) -> str:
    """Digest of a weight's bytes (dtype and shape included), to tell the written layer from the one read back."""
    import hashlib

    import torch

    w = weight.detach().contiguous().cpu()
    h = hashlib.blake2b(f"{w.dtype}{tuple(w.shape)}".encode(), digest_size=16)
    h.update(w.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fold_layers(model, target: torch.dtype) -> dict[str, str]:
    """Replace every adapter layer by an nn.Linear holding W0 + dW (fp32 sum, then cast to `target`); returns each
    layer's weight digest. Raises UserError if a folded weight is not round(W0 + dW) recomputed on its own.

    One layer at a time, so beyond the model only one layer's fp32 weight and dW are alive.
    """
    import torch
    from tqdm.auto import tqdm

    from abba_cli.adapters import adapter_layers

    # Names only: holding the layer objects would keep every upcast fp32 weight alive until the end.
    names = [name for name, _ in adapter_layers(model)]
    digests = {}
    for name in tqdm(names, desc="merge", unit="layer", disable=None):
        layer = model.get_submodule(name)
        with torch.no_grad():
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
        model.set_submodule(name, linear)
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


def merge_run(
    out: str | Path,
    run: str | Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    base: str | Path | None = None,
) -> dict[str, Any]:
    """Merge RUN_DIR's adapter into its base (or `base`, another copy of it) and write a Hugging Face model to
    OUT; returns the metadata."""
    target_name = parse_dtype(dtype)
    shown_out = Path(out)
    out = check_output_dir(shown_out, overwrite=overwrite)
    adapter = read_run_adapter(run)
    base = recorded_base(adapter.run_dir, adapter.base_model, base)
    protected = [Path(base).expanduser()] if Path(base).expanduser().is_dir() else []
    check_not_inside(out, protected, runs=[adapter.root])

    import torch

    from abba_cli.adapters import load_adapter
    from abba_cli.fsutil import atomic_directory, atomic_write_json
    from abba_cli.models import load_base

    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(phase: str) -> None:
        timings[phase] = round(time.perf_counter() - started - sum(timings.values()), 2)

    settings = _run_model_settings(adapter.root)
    # Trained on a quantized base: the merged model is the unquantized base + dW (what users ship); measure how
    # far that is from what trained, before the unquantized base is loaded (one model in memory at a time).
    quant = _run_quantization(adapter.root)
    quant_logits = None
    if quant is not None:
        quant_logits = _quantized_reference(base, adapter.run_dir, settings, quant)
        lap("quantized_reference")
    model, tokenizer = load_base(base, "auto", **settings)
    # A chat-trained run: the merged model's tokenizer carries the chat template it trained with (data, #15).
    from abba_cli.data.training_set import run_dir_chat_template

    if (template := run_dir_chat_template(adapter.run_dir, tokenizer, base)) is not None:
        tokenizer.chat_template = template
    model.eval()
    base_name = _short_dtype(model.dtype)
    target_name = target_name or base_name
    target = getattr(torch, DTYPE_NAMES[target_name])
    check_against_base(adapter, model, base)
    adapter.factors.clear()  # only the shapes were needed; load_adapter reads the weights itself
    base_keys = set(model.state_dict())
    lap("load_base")

    base_logits = _logits(model, tokenizer, CHECK_PROMPTS)
    load_adapter(model, adapter.run_dir)
    model.eval()  # the adapter layers follow it anyway; dropout must be off in the reference
    ref_logits = _logits(model, tokenizer, CHECK_PROMPTS)
    effect = compare_logits(ref_logits, base_logits)["max_rel_diff"]
    del base_logits
    quantized = None
    if quant is not None:
        quantized = {**quant, **compare_logits(quant_logits, ref_logits)}
        del quant_logits
    lap("reference_logits")

    digests = _fold_layers(model, target)
    n_layers = len(digests)
    model.to(target)
    model.config.dtype = target
    keys = set(model.state_dict())
    if keys != base_keys:
        extra, missing = sorted(keys - base_keys)[:3], sorted(base_keys - keys)[:3]
        raise RuntimeError(f"merged model's keys differ from the base's: extra {extra}, missing {missing}")
    lap("fold")

    tol = TOLERANCE[target_name]
    # fp32: the logits are the whole check; bf16/fp16: within tol or half the adapter's effect (comment above)
    logits_bound = tol if target_name == "fp32" else max(tol, 0.5 * effect)
    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        tokenizer.save_pretrained(tmp)
        lap("save")
        # Free the in-memory copy before reloading: at most one copy of the model at a time.
        del model
        gc.collect()
        check = _check_saved(tmp, tokenizer, ref_logits, digests)
        logits_ok = check["max_rel_diff"] <= logits_bound
        layers_ok = check["layers_match"]
        lap("reload_and_check")
        meta = {
            "run": str(adapter.run_dir.resolve()),
            "base_model": base,
            "adapter_type": adapter.type,
            "scaling": adapter.scaling,
            "layers_merged": n_layers,
            "base_dtype": base_name,
            "dtype": target_name,
            "check": {
                "prompts": list(CHECK_PROMPTS),
                **check,
                "tolerance_rel": logits_bound,
                "adapter_effect_rel": effect,
                "passed": logits_ok and layers_ok,
            },
            "seconds": round(time.perf_counter() - started, 2),
            "timings_s": timings,
        }
        if quantized is not None:
            # Not a pass/fail check: how far the shipped model (unquantized base + dW) is from what trained.
            meta["trained_on_quantized_base"] = quantized
        c = meta["check"]
        verdict = "passed" if c["passed"] else "FAILED"
        print(
            f"self-check {verdict}: merged ({target_name}) vs base + adapter ({base_name}) logits on "
            f"{len(CHECK_PROMPTS)} prompts: max abs diff {c['max_abs_diff']:.3g}, "
            f"relative {c['max_rel_diff']:.3g} (tolerance {logits_bound:.3g}), top-1 agreement "
            f"{c['top1_agreement']:.1%}; all {n_layers} folded layers exactly round(W0 + dW)"
            + ("" if layers_ok else ", but not as read back")
        )
        if quantized is not None:
            print(
                f"note: trained on a {quantized['quantization']} base; the merged model is the unquantized base "
                f"+ dW, and its logits differ from the {quantized['quantization']} base + adapter it trained as by "
                f"{quantized['max_rel_diff']:.3g} (relative; top-1 agreement {quantized['top1_agreement']:.1%})"
            )
        if effect <= tol:
            print(
                f"note: the adapter changes the logits by only {effect:.3g} (relative), within the "
                "tolerance, so this check cannot tell a merged model from the base (an untrained adapter?)"
            )
        if not layers_ok:
            raise UserError(
                f"merge self-check failed: read back from disk, layer {c['layers_changed_on_disk'][0]} does not "
                f"hold the weights that were written; nothing was written to {shown_out}"
            )
        if not logits_ok:
            raise UserError(
                "merge self-check failed: merged logits differ from base + adapter by "
                f"{c['max_rel_diff']:.3g} (relative), above the {target_name} tolerance {logits_bound:.3g}; "
                f"nothing was written to {shown_out}"
                + ("; try --dtype fp32" if target_name != "fp32" else "")
            )
        atomic_write_json(tmp / METADATA, meta)
    print(
        f"merged {n_layers} layers of {adapter.run_dir} into {base} -> {shown_out} "
        f"({target_name}, {meta['seconds']} s)"
    )
    return meta


def _check_saved(
    path: Path, tokenizer, ref_logits: list[torch.Tensor], digests: dict[str, str]
) -> dict[str, Any]:
    """Reload the written directory with plain transformers, as a user would; compare its logits and each folded
    layer (`_layer_check`)."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    merged.eval()
    try:
        layers = _layer_check(merged, digests)
        return {**compare_logits(ref_logits, _logits(merged, tokenizer, CHECK_PROMPTS)), **layers}
    finally:
        del merged
        gc.collect()
