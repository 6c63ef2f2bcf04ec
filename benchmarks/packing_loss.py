"""Packing and the chunked loss, measured side by side in one run of this script (three parts):

- memory: peak memory of one training step (forward, backward, AdamW step of LoRA r=32 on the seven
  projections: the loss's memory does not depend on the adapter, and LoRA starts without ABBA's SVD) with
  train.loss_impl full and chunked, at 4 x 512 and 8 x 512 tokens, every position a target
  (the loss's worst case), on the bundled SmolLM2-135M and on a Llama-3.2-1B-shaped random model (hidden 2048,
  vocabulary 128,256, tied embeddings) cut to --llama-layers decoder layers to fit this machine (the loss's memory
  does not depend on the layer count). Each cell runs in a fresh process (common.MEASURE_ENV): CPU peak = the
  step's high-water mark of resident memory above what was resident before it (VmHWM), a CUDA peak =
  max_memory_allocated. Memory figures are exact enough to quote under load.
- throughput: for the bundled commonsense and MetaMathQA-style (GSM8K) training sources tokenized with SmolLM2's
  tokenizer at max_seq_len 512, the padding fraction over a whole epoch (exact counts) and non-pad tokens per
  second of forward + backward micro-batches of SmolLM2 + ABBA, with plain padding, data.group_by_length and
  data.packing (micro-batches of --batch examples or rows), timed round-robin (common.interleaved).
- floor: ABBA's training step against our LoRA's (r = 32, the same parameter count) on packed commonsense rows,
  next to the ratio of their multiply-adds with each ABBA layer on its cheapest exact path (no launches, no memory
  traffic): the FLOP floor of the ratio.

    python -m benchmarks.packing_loss [--parts memory throughput floor] [--batch 4] [--repeats 3]
                                      [--llama-layers 2] [--dtype bf16] [--out results/packing_loss_cpu.json]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks import common

SOURCES = {"commonsense": "commonsense_bundled_train", "metamath-style (gsm8k)": "gsm8k_bundled_train"}
ABBA = {"type": "abba", "r1": 16, "r2": 16}
LORA = {"type": "lora", "r": 32}


def llama_1b_shaped(layers: int, dtype: Any):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        return LlamaForCausalLM(config).to(dtype)


def load_model(name: str, dtype: Any, llama_layers: int, adapter: dict, device: str):
    from abba_cli.adapters import inject_adapters
    from abba_cli.config import AdapterConfig

    model = common.load_smollm2(dtype) if name == "smollm2" else llama_1b_shaped(llama_layers, dtype)
    model.config.use_cache = False
    inject_adapters(model, AdapterConfig(**adapter), seed=0)
    return model.to(device)


def memory_cell(
    model_name: str, impl: str, rows: int, seq: int, dtype_name: str, layers: int, device: str
) -> dict:
    """One step's peak (run in its own process by `memory`)."""
    import torch

    from abba_cli.train.loss import micro_batch_loss

    dtype = common.DTYPES[dtype_name]
    model = load_model(model_name, dtype, layers, LORA, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (rows, seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch = {k: v.to(device) for k, v in batch.items()}
    base = common.reset_peak(device)
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
        loss = micro_batch_loss(model, batch, impl)
    loss.backward()
    optimizer.step()
    peak = common.read_peak(device)
    return {
        "model": model_name,
        "impl": impl,
        "shape": f"{rows}x{seq}",
        "step_mib": common.mib(peak - base),
        "peak_mib": common.mib(peak),
        "before_mib": common.mib(base),
        "loss": float(loss.detach()),
    }


def memory(args) -> list[dict]:
    rows = []
    for model_name in args.models:
        for r, s in (tuple(map(int, shape.split("x"))) for shape in args.shapes):
            for impl in ("full", "chunked"):
                cell = [
                    "--memory-cell",
                    model_name,
                    impl,
                    str(r),
                    str(s),
                    args.dtype,
                    str(args.llama_layers),
                    args.device,
                ]
                out = common.run_json_subprocess(__spec__.name, cell, timeout=3600)
                print(f"memory {model_name} {r}x{s} {impl}: step {out['step_mib']:.0f} MiB", file=sys.stderr)
                rows.append(out)
    return rows


def tokenized(recipe: str, tokenizer, max_seq_len: int):
    from abba_cli.config import DataConfig
    from abba_cli.data.training_set import prepare_train_dataset

    d = DataConfig(recipe=recipe, max_seq_len=max_seq_len, drop_long=True)
    return prepare_train_dataset(d, tokenizer, "SmolLM2-135M-Instruct")[0]


def padding_of(name: str, ds, batch: int, max_seq_len: int) -> tuple[float, list[list[int]]]:
    """(padding fraction over an epoch, the epoch's micro-batches as example-index lists per row)."""
    from abba_cli.data.order import epoch_order, length_grouped_order
    from abba_cli.data.packing import pack_rows

    lengths = list(ds["length"])
    if name == "packing":
        rows = pack_rows(lengths, max_seq_len, 42)
        order = [rows[i] for i in epoch_order(len(rows), 42, 0)]
        slots = len(rows) * max_seq_len
        return 1 - sum(lengths) / slots, [order[i : i + batch] for i in range(0, len(order), batch)]
    order = (
        epoch_order(len(lengths), 42, 0) if name == "plain" else length_grouped_order(lengths, 42, 0, batch)
    )
    batches = [[[i] for i in order[j : j + batch]] for j in range(0, len(order), batch)]
    padded = sum(max(lengths[r[0]] for r in b) * len(b) for b in batches)
    return 1 - sum(lengths) / padded, batches


def train_micro_batch(model, batch: dict, args, optimizer=None) -> None:
    """Forward + backward of one collated micro-batch (and the optimizer step when given)."""
    import torch

    from abba_cli.train.loss import micro_batch_loss

    dtype = common.DTYPES[args.dtype]
    batch = {k: v.to(args.device) if hasattr(v, "to") else v for k, v in batch.items()}
    with torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype != torch.float32):
        loss = micro_batch_loss(model, batch, "full")
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)


def source_throughput(label: str, ds, model, collators: dict, args) -> list[dict]:
    """Padding and tokens/s of one tokenized source under each batching."""
    from abba_cli.data.collate import batch_tokens

    plans = {name: padding_of(name, ds, args.batch, args.max_seq_len) for name in collators}
    cursor, real = dict.fromkeys(plans, 0), {name: [] for name in plans}

    def step(name: str):
        def run():
            rows = plans[name][1][cursor[name]]
            cursor[name] += 1
            b = collators[name]([[ds[i] for i in r] for r in rows])
            real[name].append(batch_tokens(b))
            train_micro_batch(model, b, args)

        return run

    fns = {n: step(n) for n in plans}
    times = common.interleaved(fns, args.repeats, args.device, warmup=1, progress=True)
    out = []
    for name, ts in times.items():
        tokens_per_s = sum(real[name][1:]) / sum(ts)  # the warm-up micro-batch is not timed
        out.append(
            {
                "source": label,
                "examples": len(ds),
                "order": name,
                "micro_batch": args.batch,
                "padding": plans[name][0],
                "tokens_per_s": tokens_per_s,
                "median_step_s": statistics.median(ts),
            }
        )
        print(f"{label} {name}: padding {plans[name][0]:.1%}, {tokens_per_s:.0f} tok/s", file=sys.stderr)
    return out


def throughput(args, tokenizer) -> list[dict]:
    from abba_cli.data.collate import make_collator
    from abba_cli.data.packing import make_packed_collator

    model = load_model("smollm2", common.DTYPES[args.dtype], 0, ABBA, args.device)
    padded = make_collator(tokenizer)
    collators = {
        "plain": lambda rows: padded([r[0] for r in rows]),
        "grouped": lambda rows: padded([r[0] for r in rows]),
        "packing": make_packed_collator(tokenizer, args.max_seq_len, None),
    }
    out = []
    for label, recipe in SOURCES.items():
        out += source_throughput(
            label, tokenized(recipe, tokenizer, args.max_seq_len), model, collators, args
        )
    return out


def layer_macs(model, tokens: int, seq: int) -> dict[str, float]:
    """Multiply-adds of one forward + backward: the frozen base (linear layers, attention scores, head) and
    what LoRA r=32 / ABBA r1=r2=16 on its cheapest exact path add per adapted layer (adapters/cost.py's terms
    with every constant 1, no launches, no memory traffic)."""
    from abba_cli.adapters.cost import path_costs

    ones = {
        "KR_COST": 1.0,
        "HYBRID_COST": 1.0,
        "BUILD_COST": 1.0,
        "ELEMENT_COST": 0.0,
        "KR_ELEMENT_COST": 0.0,
        "LAUNCH_COST": 0.0,
    }
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    base = lora = abba = 0.0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in names:
            continue
        m, n = module.weight.shape
        base += 2 * m * n * tokens  # forward + the input's gradient (the weight is frozen)
        lora += 3 * LORA["r"] * (m + n) * tokens  # x A, (xA) B forward; dA, dB and the input's gradient back
        abba += min(
            path_costs(
                m,
                n,
                16,
                16,
                tokens,
                constants=ones,
                launches={p: 0 for p in ("khatri_rao", "merged", "hybrid")},
            ).values()
        )
    c = model.config
    # QK^T and PV over rows of `seq` tokens, causal (half the pairs), forward + twice that backward.
    base += 3 * c.num_hidden_layers * tokens * seq * c.hidden_size
    base += 2 * c.vocab_size * c.hidden_size * tokens  # head forward + input gradient
    return {"base": base, "lora_added": lora, "abba_added": abba}


def floor(args, tokenizer) -> dict:
    import torch

    from abba_cli.data.packing import make_packed_collator, pack_rows

    dtype = common.DTYPES[args.dtype]
    ds = tokenized(SOURCES["commonsense"], tokenizer, args.max_seq_len)
    rows = pack_rows(list(ds["length"]), args.max_seq_len, 42)
    collate = make_packed_collator(tokenizer, args.max_seq_len, None)
    models = {
        "abba": load_model("smollm2", dtype, 0, ABBA, args.device),
        "lora": load_model("smollm2", dtype, 0, LORA, args.device),
    }
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]) for k, m in models.items()
    }
    cursor = {"i": 0}

    def step(name: str):
        def run():
            i = cursor["i"] % (len(rows) // args.batch)
            cursor["i"] += 1
            b = collate([[ds[j] for j in r] for r in rows[i * args.batch : (i + 1) * args.batch]])
            train_micro_batch(models[name], b, args, optimizers[name])

        return run

    times = common.interleaved(
        {n: step(n) for n in models}, args.repeats, args.device, warmup=1, progress=True
    )
    macs = layer_macs(models["lora"], args.batch * args.max_seq_len, args.max_seq_len)
    ratio = statistics.median(times["abba"]) / statistics.median(times["lora"])
    floor_ratio = (macs["base"] + macs["abba_added"]) / (macs["base"] + macs["lora_added"])
    return {
        "tokens": args.batch * args.max_seq_len,
        "abba_s": common.summary(times["abba"]),
        "lora_s": common.summary(times["lora"]),
        "measured_ratio": ratio,
        "floor_ratio": floor_ratio,
        **macs,
    }


def markdown(result: dict) -> str:
    parts = []
    if "memory" in result:
        rows = [[r["model"], r["shape"], r["impl"], r["step_mib"], r["peak_mib"]] for r in result["memory"]]
        parts.append(
            common.md_table(["model", "tokens", "loss_impl", "step adds (MiB)", "peak RSS (MiB)"], rows)
        )
    if "throughput" in result:
        rows = [
            [r["source"], r["order"], f"{r['padding']:.1%}", r["tokens_per_s"]] for r in result["throughput"]
        ]
        parts.append(common.md_table(["data", "batches", "padding", "tokens/s"], rows))
    if "floor" in result:
        f = result["floor"]
        parts.append(
            f"ABBA/LoRA step at {f['tokens']} tokens: measured {f['measured_ratio']:.2f}x, FLOP floor "
            f"{f['floor_ratio']:.2f}x (base {f['base']:.3g}, LoRA adds {f['lora_added']:.3g}, ABBA adds "
            f"{f['abba_added']:.3g} multiply-adds)"
        )
    return "\n\n".join(parts)


def main() -> None:
    if sys.argv[1:2] == ["--memory-cell"]:
        name, impl, r, s, dtype, layers, device = sys.argv[2:9]
        print(json.dumps(memory_cell(name, impl, int(r), int(s), dtype, int(layers), device)))
        return
    ap = common.arg_parser(__doc__)
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["memory", "throughput", "floor"],
        choices=["memory", "throughput", "floor"],
    )
    ap.add_argument("--models", nargs="+", default=["smollm2", "llama-1b-shaped"])
    ap.add_argument("--shapes", nargs="+", default=["4x512", "8x512"], help="memory: rows x tokens")
    ap.add_argument("--batch", type=int, default=4, help="examples (or packed rows) per micro-batch")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llama-layers", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES))
    ap.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result: dict[str, Any] = {
        "machine": common.machine_info(args.device),
        "args": vars(args) | {"out": str(args.out)},
    }
    tokenizer = common.load_smollm2_tokenizer() if {"throughput", "floor"} & set(args.parts) else None
    if "memory" in args.parts:
        result["memory"] = memory(args)
    if "throughput" in args.parts:
        result["throughput"] = throughput(args, tokenizer)
    if "floor" in args.parts:
        result["floor"] = floor(args, tokenizer)
    common.finish(result, args.out, markdown(result))


if __name__ == "__main__":
    main()
