"""Training-step cost of ABBA against LoRA, LoHa, HiRA and full fine-tuning at the same parameter budget.

One step = forward + backward (causal-LM loss on random tokens) + AdamW step on the trainable parameters +
zero_grad. Adapters on all seven projections (q, k, v, o, gate, up, down). Budgets: ABBA r1 = r2 = 16,
LoRA / HiRA r = 32, LoHa r = 16 (all (r1+r2)(m+n) = 32(m+n) parameters per layer). Adapter dropout is 0 unless
`--dropout P` (the shipped configs train with 0.05): then PEFT LoRA and our ABBA/LoRA/HiRA drop out their input
with P; PEFT LoHa has no input dropout (its module/rank dropouts are other regularisers) and stays at 0.

Times: all variants live in one process and are stepped round-robin (see common.interleaved); ratios are the
median of per-round ratios against PEFT LoRA. Peak memory: one fresh subprocess per variant (common docstring).

    python -m benchmarks.step_bench                               # SmolLM2-135M, CPU fp32, 4 x 256 tokens
    python -m benchmarks.step_bench --device cuda --dtype bf16 --model stack4096 --layers 4 --batch 4 --seq 2048
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks import common

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["peft_lora", "abba", "abba_merged", "abba_kr", "abba_hybrid", "lora", "hira", "peft_loha", "full"]
LABELS = {
    "peft_lora": "PEFT LoRA r=32",
    "abba": "ABBA r1=r2=16 (auto)",
    "abba_merged": "ABBA r1=r2=16 (merged path)",
    "abba_kr": "ABBA r1=r2=16 (Khatri-Rao path)",
    "abba_hybrid": "ABBA r1=r2=16 (hybrid path)",
    "lora": "our LoRA r=32",
    "hira": "our HiRA r=32",
    "peft_loha": "PEFT LoHa r=16",
    "full": "full fine-tuning",
}


def build_base(args: argparse.Namespace):
    dtype = common.DTYPES[args.dtype]
    if args.model == "smollm2":
        return common.load_smollm2(dtype, args.device)
    # A stack of Mistral-7B-shaped decoder blocks (4096 wide, 14336 MLP, GQA 32/8 heads), random weights:
    # the per-layer shapes of a 7B model without loading one.
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=args.layers,
        vocab_size=32000,
        max_position_embeddings=max(4096, args.seq),
    )
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model


def make_variant(base, name: str, dropout: float = 0.0):
    """A deep copy of the base with the variant's trainable parameters; returns (model, trainable params)."""
    from abba_cli.adapters import inject_adapters
    from abba_cli.config import AdapterConfig

    model = copy.deepcopy(base)
    if name == "full":
        model.requires_grad_(True)
    elif name.startswith("peft_"):
        from peft import LoHaConfig, LoraConfig, get_peft_model

        if name == "peft_lora":
            cfg = LoraConfig(r=32, lora_alpha=64, lora_dropout=dropout, target_modules=TARGETS)
        else:
            cfg = LoHaConfig(r=16, alpha=16, module_dropout=0.0, rank_dropout=0.0, target_modules=TARGETS)
        model = get_peft_model(model, cfg)
    else:
        kind = "abba" if name.startswith("abba") else name
        extra: dict[str, Any] = {"r1": 16, "r2": 16} if kind == "abba" else {"r": 32}
        if name != "abba" and kind == "abba":
            extra["path"] = name.removeprefix("abba_").replace("kr", "khatri_rao")
        extra["dropout"] = dropout
        inject_adapters(model, AdapterConfig(type=kind, target_modules=TARGETS, **extra), seed=0)
        if kind == "abba":
            # Random B2 so the timed update is a generic one (B2 = 0 at init changes no cost, but be general).
            with torch.no_grad():
                for p in (p for n, p in model.named_parameters() if n.endswith("B2")):
                    p.normal_(0, 1e-3)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def make_step(model, params, args: argparse.Namespace):
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(args.device)
    opt = torch.optim.AdamW(params, lr=1e-5)
    autocast = args.dtype != "fp32"
    dev_type = torch.device(args.device).type

    def step() -> None:
        with torch.autocast(dev_type, dtype=common.DTYPES[args.dtype], enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure_memory(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Run in a fresh process: peak memory of `steps` training steps of one variant after warm-up."""
    base = build_base(args)
    model, params = make_variant(base, name, args.dropout)
    del base
    gc.collect()
    step = make_step(model, params, args)
    for _ in range(2):  # allocate optimizer state and let lazy initialisation happen
        step()
    gc.collect()
    resting = common.reset_peak(args.device)
    for _ in range(args.mem_steps):
        step()
    peak = common.read_peak(args.device)
    return {
        "variant": name,
        "resting_bytes": resting,
        "peak_bytes": peak,
        "step_peak_bytes": peak - resting,
        "trainable": sum(p.numel() for p in params),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    base = build_base(args)
    models = {}
    steps = {}
    trainable = {}
    for name in args.variants:
        model, params = make_variant(base, name, args.dropout)
        models[name] = model
        trainable[name] = sum(p.numel() for p in params)
        steps[name] = make_step(model, params, args)
    del base
    gc.collect()
    times = common.interleaved(steps, args.repeats, args.device, warmup=args.warmup, progress=True)

    memory: dict[str, Any] = {}
    if not args.no_memory:
        del models, steps
        gc.collect()
        for name in args.variants:
            memory[name] = common.run_json_subprocess(
                __spec__.name, [*_passthrough(args), "--memory-only", name]
            )
    ref = "peft_lora" if "peft_lora" in times else args.variants[0]
    rows = []
    for name in args.variants:
        r_med, r_lo, r_hi = common.ratio_spread(times[name], times[ref])
        row = {
            "variant": name,
            "label": LABELS[name],
            "trainable": trainable[name],
            "time": common.summary(times[name]),
            "ratio_vs_ref": {"median": r_med, "min": r_lo, "max": r_hi},
        }
        if name in memory:
            row["memory"] = memory[name]
        rows.append(row)
    return {
        "config": {k: v for k, v in vars(args).items() if k not in {"memory_only", "out"}},
        "reference": ref,
        "machine": common.machine_info(args.device),
        "rows": rows,
    }


def _passthrough(args: argparse.Namespace) -> list[str]:
    return [
        f"--model={args.model}",
        f"--layers={args.layers}",
        f"--device={args.device}",
        f"--dtype={args.dtype}",
        f"--batch={args.batch}",
        f"--seq={args.seq}",
        f"--mem-steps={args.mem_steps}",
        f"--threads={args.threads}",
        f"--dropout={args.dropout}",
    ]


def to_markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    ref = res["reference"]
    ref_mem = next((r.get("memory") for r in res["rows"] if r["variant"] == ref), None)
    headers = [
        "variant",
        "trainable params",
        "step s (median)",
        "min..max",
        f"time / {ref} (median, min..max)",
    ]
    if ref_mem:
        headers += ["step peak MiB", f"peak / {ref}", "VmHWM / max alloc MiB"]
    rows = []
    for r in res["rows"]:
        t, q = r["time"], r["ratio_vs_ref"]
        row = [
            r["label"],
            f"{r['trainable'] / 1e6:.2f} M",
            f"{t['median']:.3f}",
            f"{t['min']:.3f}..{t['max']:.3f}",
            f"{q['median']:.3f} ({q['min']:.2f}..{q['max']:.2f})",
        ]
        if ref_mem:
            m = r["memory"]
            row += [
                f"{common.mib(m['step_peak_bytes']):.0f}",
                f"{m['step_peak_bytes'] / ref_mem['step_peak_bytes']:.3f}",
                f"{common.mib(m['peak_bytes']):.0f}",
            ]
        rows.append(row)
    head = (
        (f"{cfg['model']} ({cfg['layers']} layers)" if cfg["model"] == "stack4096" else cfg["model"])
        + f", {cfg['device']} {cfg['dtype']}, {cfg['batch']} x {cfg['seq']} tokens, "
        + f"adapter dropout {cfg.get('dropout', 0.0):g}, {cfg['repeats']} interleaved rounds"
    )
    return f"{head}\n\n" + common.md_table(headers, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.arg_parser(__doc__)
    p.add_argument("--model", choices=["smollm2", "stack4096"], default="smollm2")
    p.add_argument("--layers", type=int, default=4, help="decoder blocks of the stack4096 model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(common.DTYPES), default="fp32", help="bf16/fp16: autocast")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dropout", type=float, default=0.0, help="adapter input dropout (configs ship 0.05)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--memory-only", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help="write the JSON result here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        print(json.dumps(measure_memory(args, args.memory_only)))
        return {}
    res = run(args)
    return common.finish(res, args.out, to_markdown(res))


if __name__ == "__main__":
    main()
