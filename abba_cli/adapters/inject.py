"""Putting adapter layers into a model: match nn.Linear modules by name suffix, replace them, freeze the rest.

bitsandbytes' Linear4bit / Linear8bitLt (a quantized base) count as nn.Linear: the adapter wraps them and the
frozen part runs through their quantized matmul (adapters.base). ABBA's fused paths build W0 + dW, which a packed
weight cannot hold, so ABBA layers on a quantized base always run the (exact) Khatri-Rao path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from abba_cli.adapters.abba import ABBALinear, abba_scaling
from abba_cli.adapters.base import AdapterLinear
from abba_cli.adapters.chain import ABBAChainLinear, chain_scaling
from abba_cli.adapters.dora import DoRALinear
from abba_cli.adapters.hira import HiRALinear
from abba_cli.adapters.lora import LoRALinear, lora_scaling
from abba_cli.config import LORA_SCALED, AdapterConfig
from abba_cli.errors import UserError
from abba_cli.models.quantization import is_quantized_linear


def scaling_for(cfg: AdapterConfig) -> float:
    """The numeric s the layers apply (stored in adapter_config.json)."""
    if cfg.type == "abba":
        if cfg.ranks is not None:
            return chain_scaling(cfg.alpha, cfg.ranks, cfg.scaling)
        return abba_scaling(cfg.alpha, cfg.r1, cfg.r2, cfg.scaling)
    if cfg.type in LORA_SCALED:
        return lora_scaling(cfg.alpha, cfg.r, cfg.use_rslora)
    return cfg.alpha / cfg.r


def matches_target(name: str, targets: list[str]) -> bool:
    """Whether module `name` is one `adapter.target_modules` names (a suffix at a dot boundary)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _build_layer(
    base: nn.Linear, cfg: AdapterConfig, scaling: float, name: str, seed: int, init: bool
) -> AdapterLinear:
    m, n = base.out_features, base.in_features
    limit = min(m, n)
    if cfg.type == "abba":
        ranks = {f"ranks[{i}]" if cfg.ranks else f"r{i + 1}": r for i, r in enumerate(cfg.abba_ranks())}
    else:
        ranks = {"r": cfg.r}
    for key, value in ranks.items():
        if value > limit:
            raise UserError(
                f"adapter.{key}={value} is larger than {name} allows ({m}x{n}: rank at most {limit}); "
                f"choose adapter.{key} <= {limit}"
            )
    quantized = is_quantized_linear(base)
    if cfg.type == "abba":
        # On a packed weight only the Khatri-Rao path exists (merged/hybrid build W0 + dW); any recorded
        # path is an execution choice, all exact, so an adapter trained on a full base loads here too.
        path = "khatri_rao" if quantized else cfg.path
        init_method = "svd" if cfg.init == "default" else cfg.init
        if cfg.ranks is not None:
            return ABBAChainLinear(base, cfg.ranks, scaling, cfg.dropout, path, name, seed, init, init_method)
        return ABBALinear(base, cfg.r1, cfg.r2, scaling, cfg.dropout, path, name, seed, init, init_method)
    # LoRA-Pro trains plain LoRA factors; only its optimizer step differs (train/lora_pro.py).
    if cfg.type in ("lora", "lora_pro"):
        return LoRALinear(base, cfg.r, scaling, cfg.dropout, cfg.init, name, seed, init)
    if cfg.type == "dora":  # on a packed base: W0 dequantized for the row norms, as PEFT does
        return DoRALinear(base, cfg.r, scaling, cfg.dropout, name, seed, init)
    if quantized:
        raise UserError(
            f"adapter.type hira multiplies its update by W0 itself, and {name} is quantized (packed weights); "
            "use adapter.type abba or lora on a quantized base, or model.quantization: none"
        )
    return HiRALinear(base, cfg.r, scaling, cfg.dropout, name, seed, init)


def inject_adapters(
    model: nn.Module, cfg: AdapterConfig, *, seed: int = 0, init: bool = True, scaling: float | None = None
) -> list[str]:
    """Replace every nn.Linear whose name ends with a target suffix; freeze everything else.

    `init=False` skips the (SVD) initialisation when weights are about to be loaded; `scaling` overrides the
    computed s (loading uses the number stored in the adapter config). Returns the adapted module names.
    """
    if any(True for _ in adapter_layers(model)):
        raise UserError("this model already has adapters; load the base model again to inject new ones")
    s = scaling_for(cfg) if scaling is None else scaling
    matched: list[tuple[str, nn.Module]] = [
        (name, mod)
        for name, mod in model.named_modules()
        if name and matches_target(name, cfg.target_modules)
    ]
    not_linear = [f"{name} ({type(mod).__name__})" for name, mod in matched if not _is_linear(mod)]
    if not_linear:
        raise UserError(
            f"adapter.target_modules matches modules that are not nn.Linear: {', '.join(not_linear[:3])}; "
            "adapters apply to nn.Linear layers only"
        )
    if not matched:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if _is_linear(mod)})
        raise UserError(
            f"adapter.target_modules {cfg.target_modules} matches no nn.Linear in the model; "
            f"its linear layers end with: {', '.join(suffixes)}"
        )
    _refuse_tied(model, matched)
    # Every layer is built (and its ranks checked) before the first one is swapped in, so a refused layer
    # leaves the model as it was.
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    # Taken before building: a quantized layer's wrapper pins the wrapped bitsandbytes layer to training mode.
    modes = [base.training for _, base in matched]
    try:
        layers = [(name, _build_layer(base, cfg, s, name, seed, init)) for name, base in matched]
    except BaseException:
        for p, flag in requires_grad:  # building a layer freezes the weight it wraps
            p.requires_grad_(flag)
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    for (name, layer), training in zip(layers, modes, strict=True):
        # A new module starts in training mode; follow the layer it replaces, so that injecting into a model
        # in eval mode (merge, evaluation) does not switch adapter dropout on.
        layer.train(training)
        model.set_submodule(name, layer)
        for p in layer.factors().values():
            p.requires_grad_(True)
    return [name for name, _ in matched]


def remove_adapters(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put back the modules that `inject_adapters` replaced (`originals`: name -> module, taken before)."""
    for name, _ in list(adapter_layers(model)):
        model.set_submodule(name, originals[name])


def _is_linear(module: nn.Module) -> bool:
    # Exactly nn.Linear: its subclasses (NonDynamicallyQuantizableLinear, ...) have other forwards; bitsandbytes'
    # quantized layers are the subclasses the adapters know how to run.
    return type(module) is nn.Linear or is_quantized_linear(module)


def _refuse_tied(model: nn.Module, matched: list[tuple[str, nn.Module]]) -> None:
    """Refuse a target whose weight is shared with another module (lm_head tied to embed_tokens): merging
    its update would rewrite the shared tensor, so the other module (the input embedding) would change too."""
    holders: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(pname)
    for name, mod in matched:
        others = [h for h in holders.get(id(mod.weight), []) if h != f"{name}.weight"]
        if others:
            raise UserError(
                f"adapter.target_modules: {name}'s weight is tied to {others[0]} (tie_word_embeddings), so "
                f"merging an update into {name} would change {others[0]} too; remove "
                f"{name.rsplit('.', 1)[-1]} from adapter.target_modules"
            )


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, AdapterLinear):
            yield name, mod


def adapter_state_dict(model: nn.Module) -> dict:
    """fp32 factors named `<module>.<factor>` (plus PiSSA's B0/A0), detached, on their current device."""
    out = {}
    for name, layer in adapter_layers(model):
        for fname, tensor in layer.factors().items():
            out[f"{name}.{fname}"] = tensor.detach()
        for bname, buf in layer.named_buffers(recurse=False):
            out[f"{name}.{bname}"] = buf.detach()
    return out


def merge_adapters(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def unwrap_adapters(model: nn.Module) -> None:
    """Replace every adapter layer by a plain nn.Linear with its current weight (merge first to keep dW)."""
    for name, layer in list(adapter_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.to_linear())


def _logical_numel(p: nn.Parameter) -> int:
    """Weights a parameter stands for: a packed 4-bit one holds two per byte (its quant_state knows the shape)."""
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    return math.prod(shape) if shape is not None else p.numel()


@dataclass
class TrainableSummary:
    trainable: int
    total: int
    adapted_layers: int
    per_layer: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} / {self.total:,} ({self.percent:.4f}%) "
            f"in {self.adapted_layers} adapted layers"
        )


def trainable_summary(model: nn.Module) -> TrainableSummary:
    params = {id(p): p for p in model.parameters()}.values()  # tied weights counted once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(_logical_numel(p) for p in params)
    per_layer = {
        name: sum(p.numel() for p in layer.factors().values()) for name, layer in adapter_layers(model)
    }
    return TrainableSummary(trainable, total, len(per_layer), per_layer)
