"""Kernel-launching aten ops of one training micro-batch (forward + backward) per adapter path, against LoRA.

On a GPU at the shipped micro-batch (1 x 512 tokens) a decoder layer's matmuls take about a millisecond, so each
kernel launch (several microseconds) counts: the number of launching ops is the step's cost there. This counts
them deterministically on the CPU with a TorchDispatchMode: every aten op that reaches a backend kernel, minus
views and metadata ops (they launch nothing). The model: a random 2-layer Llama of width 256, bf16 autocast with
fp32 adapter factors (as `abba train` runs), adapters on all seven projections; ABBA r1 = r2 = 16 on each path,
LoRA r = 32 (the same parameter budget).

    python -m benchmarks.op_count                  # the table
    python -m benchmarks.op_count --out ops.json   # and the counts per op
"""

from __future__ import annotations

import collections
import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import common

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ABBA_PATHS = ["auto", "khatri_rao", "merged", "hybrid"]
VARIANTS = ["none", "peft_lora", "lora", *(f"abba_{p}" for p in ABBA_PATHS)]

# Ops that allocate, alias or describe a tensor without running a kernel (views are recognised by their schema).
_NO_KERNEL = {
    "aten::detach",
    "aten::_unsafe_view",
    "aten::lift_fresh",
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::set_",
    "aten::sym_size",
    "aten::sym_stride",
    "aten::sym_numel",
    "aten::sym_storage_offset",
    "aten::is_same_size",
    "aten::_local_scalar_dense",
}


def launches_kernel(func: torch._ops.OpOverload) -> bool:
    return not func.is_view and func._schema.name not in _NO_KERNEL


class OpCounter(TorchDispatchMode):
    """Counts kernel-launching aten ops by name (the overload packet, e.g. `aten.mm`)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_kernel(func):
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def build_base(width: int = 256, layers: int = 2, vocab: int = 1024, seed: int = 0):
    """A random bf16 Llama (GQA like the shipped models); training runs it under bf16 autocast."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=width,
        intermediate_size=width * 11 // 4,
        num_attention_heads=max(1, width // 64),
        num_key_value_heads=max(1, width // 128),
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def make_variant(base, variant: str, r: int = 32, dropout: float = 0.0):
    """A copy of `base` with the variant's adapter (ABBA r1 = r2 = r / 2, LoRA r), B2 random so dW != 0."""
    from abba_cli.adapters import inject_adapters
    from abba_cli.config import AdapterConfig

    model = copy.deepcopy(base)
    if variant == "peft_lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=TARGETS)
        model = get_peft_model(model, cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 1e-3)
        return model
    if variant == "none":
        # The frozen model's own backward (dx through every layer, as under an adapter): the input embedding is
        # the one trainable tensor, so the gradient has to flow all the way down.
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
        return model
    if variant == "lora":
        cfg = AdapterConfig(type="lora", r=r, target_modules=TARGETS, dropout=dropout)
    else:
        path = variant.removeprefix("abba_")
        cfg = AdapterConfig(
            type="abba", r1=r // 2, r2=r // 2, path=path, target_modules=TARGETS, dropout=dropout
        )
    inject_adapters(model, cfg, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("B2", ".B")):
                p.normal_(0, 1e-3)
    return model


def count_micro_batch(model, batch: int, seq: int, dtype: torch.dtype = torch.bfloat16) -> OpCounter:
    """Ops of forward + backward of one micro-batch (after one warm-up pass, so lazy set-up is not counted)."""
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (batch, seq), generator=gen)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    step()
    model.zero_grad(set_to_none=True)
    counter = OpCounter()
    with counter:
        step()
    model.zero_grad(set_to_none=True)
    return counter


def count_all(
    width: int = 256,
    layers: int = 2,
    batch: int = 1,
    seq: int = 512,
    variants: list[str] | None = None,
    dropout: float = 0.0,
) -> dict[str, Any]:
    base = build_base(width, layers)
    rows = {}
    for variant in variants or VARIANTS:
        counter = count_micro_batch(make_variant(base, variant, dropout=dropout), batch, seq)
        rows[variant] = {"total": counter.total, "ops": dict(counter.counts.most_common())}
    lora = rows.get("lora", {}).get("total")
    for row in rows.values():
        row["vs_lora"] = round(row["total"] / lora, 3) if lora else None
    config = {"width": width, "layers": layers, "batch": batch, "seq": seq, "dropout": dropout}
    return {"config": config, "rows": rows}


def to_markdown(res: dict[str, Any]) -> str:
    rows = res["rows"]
    base = rows.get("none", {}).get("total")
    lines = [
        "| variant | ops / micro-batch | adapter ops | vs our LoRA | _to_copy |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        extra = row["total"] - base if base is not None else "-"
        ratio = f"{row['vs_lora']:.2f}x" if row["vs_lora"] else "-"
        lines.append(
            f"| {name} | {row['total']} | {extra} | {ratio} | {row['ops'].get('aten._to_copy', 0)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.arg_parser(__doc__)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--variants", nargs="+", choices=VARIANTS)
    p.add_argument("--verbose", action="store_true", help="print the counts per op of each variant")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    res = count_all(args.width, args.layers, args.batch, args.seq, args.variants, args.dropout)
    print(to_markdown(res))
    if args.verbose:
        for name, row in res["rows"].items():
            print(f"\n{name}: " + ", ".join(f"{k.removeprefix('aten.')} {v}" for k, v in row["ops"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
