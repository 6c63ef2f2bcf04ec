"""Which adapter block each method of `abba compare` gets: the same trainable-parameter count as the config's.

On an m x n layer ABBA trains (r1 + r2)(m + n) parameters, LoRA and HiRA r (m + n): every adapter method's count
is its rank sum times the same per-layer m + n, so one rank sum R (the config's r1 + r2, or its r) matches all of
them exactly on the same target modules: LoRA / HiRA r = R, ABBA r1 = ceil(R/2), r2 = floor(R/2). rsLoRA and
PiSSA are LoRA at r = R with another scale or initialisation; LoRA-Pro is LoRA at r = R with another optimizer
step. DoRA at r = R trains its magnitude too, one parameter per output row of each adapted layer: that extra is
printed beside its count, as the ABBA paper counts it. Full fine-tuning trains every weight and is not
matched. The counts printed come from the model itself (built on the meta device: no weights are read), and a
method whose count differs from the budget (a per-method --set that changes a rank) is refused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from abba_cli.analysis.compare.sweep import Sweep, apply_cell, cells, changes_rank
from abba_cli.config import RunConfig, apply_overrides, validate_config
from abba_cli.errors import UserError

METHODS = ("abba", "lora", "hira", "rslora", "pissa", "dora", "lora_pro", "full")
# Methods that are an adapter.type of their own at rank R (the others are LoRA variants).
OWN_TYPES = ("hira", "dora", "lora_pro")


def parse_methods(text: str) -> list[str]:
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UserError(
            f"--methods {text!r}: unknown method {', '.join(unknown) or '(none given)'}; valid: {', '.join(METHODS)}"
        )
    if len(set(names)) != len(names):
        raise UserError(f"--methods {text!r}: a method is listed twice")
    return names


def split_sets(sets: list[str], methods: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """--set KEY=VALUE applies to every method; --set METHOD:KEY=VALUE to that method only (after its block)."""
    common: list[str] = []
    per_method: dict[str, list[str]] = {m: [] for m in methods}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(
                f"--set {item!r}: expected KEY=VALUE or METHOD:KEY=VALUE, e.g. --set lora:train.lr=3e-4"
            )
        if ":" not in key:
            common.append(item)
            continue
        method, _, key = key.partition(":")
        if method not in per_method:
            raise UserError(
                f"--set {item!r}: {method!r} is not one of the compared methods ({', '.join(methods)})"
            )
        per_method[method].append(f"{key}={value}")
    return common, per_method


def rank_sum(cfg: RunConfig) -> int:
    a = cfg.adapter
    if a.type == "full":
        raise UserError(
            "adapter.type full: the config must describe an adapter (e.g. adapter.type lora, adapter.r 16) whose "
            "trainable-parameter count the methods are matched to"
        )
    return sum(a.abba_ranks()) if a.type == "abba" else a.r


def method_block(method: str, cfg: RunConfig) -> dict[str, Any]:
    """The adapter section `method` trains with, at the config's budget (its own alpha kept when the config
    already describes this method, else the method's default scale)."""
    a, total = cfg.adapter, rank_sum(cfg)
    common = {"dropout": a.dropout, "target_modules": list(a.target_modules)}
    if method == "full":
        return {"type": "full", "target_modules": list(a.target_modules)}
    if method == "abba":
        if total < 2:
            raise UserError(
                f"abba cannot match the budget of {a.type} r={total}: it needs r1 + r2 = {total} with r1, r2 >= 1"
            )
        if a.type == "abba":
            ranks = {"ranks": list(a.ranks)} if a.ranks is not None else {"r1": a.r1, "r2": a.r2}
            return {
                "type": "abba",
                **ranks,
                "init": a.init,
                "alpha": a.alpha,
                "scaling": a.scaling,
                "path": a.path,
                **common,
            }
        return {"type": "abba", "r1": (total + 1) // 2, "r2": total // 2, **common}
    kind = method if method in OWN_TYPES else "lora"
    variant = {"rslora": {"use_rslora": True}, "pissa": {"init": "pissa"}}.get(method, {})
    same = (
        a.type == kind and a.use_rslora == (method == "rslora") and (a.init == "pissa") == (method == "pissa")
    )
    return {"type": kind, "r": total, **({"alpha": a.alpha} if same else {}), **variant, **common}


@dataclass
class MethodPlan:
    method: str
    raw: dict  # the whole config, this method's adapter block and --set applied (no seed, no output_dir yet)
    cfg: RunConfig
    trainable: int
    describe: str
    extra: int = 0  # trainable parameters beyond the rank budget (DoRA's magnitudes)
    row: str = ""  # the row's name in run folders and the table: the method, plus the sweep cell's slug
    label: str = ""  # the row as the table shows it: "abba", or "abba alpha=16"

    def __post_init__(self) -> None:
        self.row = self.row or self.method
        self.label = self.label or self.method


def plan_methods(
    raw: dict,
    source: str,
    methods: list[str],
    per_method: dict[str, list[str]],
    sweeps: list[Sweep] | None = None,
) -> list[MethodPlan]:
    """One MethodPlan per method and sweep cell, counted on the meta-device model; UserError when a count misses
    the budget (not checked when a swept key is a rank: those rows differ in parameters by design)."""
    cfg = validate_config(raw, source)
    budget_total = rank_sum(cfg)
    model = _meta_model(cfg)
    budget, budget_extra = _count(model, cfg)
    budget -= budget_extra  # a DoRA config's budget is its rank's; every method adds its own extra
    matched = not changes_rank(sweeps or [])
    plans = []
    for method in methods:
        mraw = copy.deepcopy(raw)
        mraw["adapter"] = method_block(method, cfg)
        apply_overrides(mraw, per_method.get(method, []))
        for cell in cells(sweeps or []):
            craw = apply_cell(mraw, cell)
            where = f"{source} ({method}{' ' + cell.label if cell.label else ''})"
            mcfg = validate_config(craw, where)
            try:
                count, extra = _count(model, mcfg)
            except UserError as e:
                what = f"{method} cannot match the budget (rank sum {budget_total})" if matched else where
                raise UserError(f"{what}: {e}") from None
            if matched and method != "full" and count - extra != budget:
                raise UserError(
                    f"{method}: {count:,} trainable parameters, but the budget is {budget:,} (rank sum "
                    f"{budget_total}; --set {method}:... changed a rank?); compare matches every adapter method to "
                    "the config's count unless a swept key is a rank"
                )
            describe = describe_block(mcfg)
            if extra:
                describe += f" (+{extra:,} magnitude parameters beyond the budget)"
            row = f"{method}_{cell.slug}" if cell.slug else method
            label = f"{method} {cell.label}" if cell.label else method
            plans.append(MethodPlan(method, craw, mcfg, count, describe, extra, row, label))
    return plans


def describe_block(cfg: RunConfig) -> str:
    from abba_cli.adapters import scaling_for

    a = cfg.adapter
    if a.type == "full":
        return "every weight (not matched: full fine-tuning trains the whole model)"
    if a.type == "abba":
        ranks = f"ranks={a.ranks}" if a.ranks is not None else f"r1={a.r1} r2={a.r2}"
    else:
        ranks = f"r={a.r}"
    extra = " rsLoRA" if a.use_rslora else " PiSSA init" if a.init == "pissa" else ""
    if a.type == "abba" and a.init not in ("default", "svd"):
        extra = f" init {a.init}"
    return f"{a.type}{extra} {ranks} alpha={a.alpha:g} (s={scaling_for(a):g})"


def format_budget(plans: list[MethodPlan], cfg: RunConfig) -> str:
    lines = [f"budget: {describe_block(cfg)} on {', '.join(cfg.adapter.target_modules)}"]
    width = max(len(p.label) for p in plans)
    for p in plans:
        lines.append(f"  {p.label.ljust(width)}  {p.trainable:>14,}  {p.describe}")
    return "\n".join(lines)


def _meta_model(cfg: RunConfig) -> Any:
    from abba_cli.models.loading import load_base

    m = cfg.model
    model, _ = load_base(
        m.name_or_path,
        m.dtype,
        trust_remote_code=m.trust_remote_code,
        revision=m.revision,
        empty_weights=True,
    )
    return model


def _count(model: Any, cfg: RunConfig) -> tuple[int, int]:
    """(trainable parameters `cfg` gives on `model`, how many of them are DoRA magnitudes); adapters injected
    and removed again, nothing initialised."""
    from abba_cli.adapters import adapter_layers, inject_adapters, trainable_summary
    from abba_cli.adapters.inject import remove_adapters

    if cfg.adapter.type == "full":
        return trainable_summary(model).total, 0
    originals = dict(model.named_modules())
    inject_adapters(model, cfg.adapter, init=False)
    try:
        magnitudes = sum(layer.m.numel() for _, layer in adapter_layers(model) if layer.kind == "dora")
        return trainable_summary(model).trainable, magnitudes
    finally:
        remove_adapters(model, originals)
