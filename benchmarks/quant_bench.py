"""Quantized bases (model.quantization): measured memory and step time on SmolLM2 (CPU), computed GPU memory for
the paper configs.

Measured: each base variant runs in a fresh subprocess (common.run_json_subprocess), loads the bundled
SmolLM2-135M through abba_cli.models.loading.load_base, injects ABBA r1 = r2 = 16 on all seven projections, and runs
AdamW steps on a fixed random batch (micro-batch 4 x 128 tokens). Reported per variant: the bytes of the base's
tensors (state dict, quantization constants included; exact), the resident memory after loading (VmRSS), the
peak resident memory over the training steps (VmHWM, common.read_peak), and the median step time after two
warm-up steps. Variants are run round-robin (common.round_robin), so background load hits them alike.

    python -m benchmarks.quant_bench                 # 3 rounds of fp32, bf16, nf4 (bf16 compute), nf4 (fp32)
    python -m benchmarks.quant_bench --rounds 1 --steps 4
    python -m benchmarks.quant_bench --estimate      # the computed GPU table of README "Quantized bases"
    python -m benchmarks.quant_bench --sizes         # bytes of each variant's base tensors only (exact, no timing)

Run the measurement only on a quiet machine (`uptime` load below 1.5): the times are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks import common

# name -> (model.dtype, model.quantization)
VARIANTS = {
    "fp32": ("float32", "none"),
    "bf16": ("bfloat16", "none"),
    "nf4 (bf16 compute)": ("bfloat16", "nf4"),
    "nf4 (fp32 compute)": ("float32", "nf4"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------ measured (CPU)


def base_bytes(model) -> int:
    """Bytes of the model's tensors (state dict: bitsandbytes' quantization constants included), each storage
    once: a tied lm_head is listed under two keys but held once."""
    seen = {t.data_ptr(): t.nbytes for t in model.state_dict().values()}
    return sum(seen.values())


def child(name: str, steps: int, micro: int, seq: int) -> dict:
    """One variant in this (fresh) process; returns its figures."""
    import torch

    from abba_cli.adapters import inject_adapters
    from abba_cli.config import AdapterConfig
    from abba_cli.models.loading import load_base

    torch.manual_seed(0)
    dtype, quantization = VARIANTS[name]
    model, _ = load_base(str(common.smollm2_dir()), dtype, quantization=quantization)
    nbytes = base_bytes(model)
    loaded_rss = common._status_kib("VmRSS") * 1024
    inject_adapters(model, AdapterConfig(type="abba", r1=16, r2=16, target_modules=TARGETS), seed=0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (micro, seq), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step()  # optimizer state allocated: from here on the resident set is the steady one
    common.reset_peak("cpu")
    times = [step() for _ in range(steps + 1)][1:]
    return {
        "variant": name,
        "base_bytes": nbytes,
        "rss_after_load": loaded_rss,
        "peak_rss": common.read_peak("cpu"),
        "step_s": statistics.median(times),
        "step_s_all": times,
    }


def sizes() -> dict[str, float]:
    """MiB of the base's tensors per variant (state dict, quantization constants included): exact, any load."""
    from abba_cli.models.loading import load_base

    out = {}
    for name, (dtype, quantization) in VARIANTS.items():
        model, _ = load_base(str(common.smollm2_dir()), dtype, quantization=quantization)
        out[name] = round(common.mib(base_bytes(model)), 1)
        del model
    return out


def measure(rounds: int, steps: int, micro: int, seq: int) -> dict:
    def run(name: str):
        args = ["--child", name, "--steps", str(steps), "--micro", str(micro), "--seq", str(seq)]
        return lambda: common.run_json_subprocess(__spec__.name, args, timeout=900)

    out = common.round_robin({name: run(name) for name in VARIANTS}, rounds)
    rows = {}
    for name, runs in out.items():
        rows[name] = {
            "base_MiB": round(common.mib(runs[0]["base_bytes"]), 1),
            "rss_after_load_MiB": round(common.mib(statistics.median(r["rss_after_load"] for r in runs)), 1),
            "peak_rss_MiB": round(common.mib(statistics.median(r["peak_rss"] for r in runs)), 1),
            "step_s": round(statistics.median(r["step_s"] for r in runs), 3),
            "step_s_range": [
                round(min(r["step_s"] for r in runs), 3),
                round(max(r["step_s"] for r in runs), 3),
            ],
        }
    return {
        "setting": {
            "rounds": rounds,
            "steps": steps,
            "micro_batch": micro,
            "seq": seq,
            "adapter": "abba 16+16",
        },
        "machine": common.machine_info("cpu"),
        "rows": rows,
    }


def measured_table(result: dict) -> str:
    lines = [
        "| base | base tensors (MiB) | RSS after load (MiB) | peak RSS in training (MiB) | step (s), median [range] |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in result["rows"].items():
        lo, hi = r["step_s_range"]
        lines.append(
            f"| {name} | {r['base_MiB']} | {r['rss_after_load_MiB']} | {r['peak_rss_MiB']} | "
            f"{r['step_s']} [{lo}-{hi}] |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ computed (GPU)

# Public config.json values of the paper's bases (hidden, intermediate, layers, heads, kv heads, head_dim, vocab,
# tied embeddings) and the configs/*.yaml settings that size the activations (micro-batch, max_seq_len,
# gradient checkpointing). Gemma-2's extra norms and soft-capping are left out (a few % of its activations).
PAPER = {
    "Llama-3.2-1B (configs/llama3.2-1b_commonsense.yaml)": (
        2048,
        8192,
        16,
        32,
        8,
        64,
        128256,
        True,
        6,
        256,
        False,
    ),
    "Llama-3.2-3B (configs/llama3.2-3b_commonsense.yaml)": (
        3072,
        8192,
        28,
        24,
        8,
        128,
        128256,
        True,
        6,
        256,
        False,
    ),
    "Mistral-7B (configs/mistral_metamath.yaml)": (4096, 14336, 32, 32, 8, 128, 32000, False, 1, 512, True),
    "Gemma-2-9B (configs/gemma2-9b_metamath.yaml)": (3584, 14336, 42, 16, 8, 256, 256000, True, 1, 512, True),
}
R1 = R2 = 16
# Bytes per weight of a 4-bit layer: 4 bits + one fp32 absmax per 64-weight block (bitsandbytes' blocksize);
# double quantization stores the absmax in 8 bits plus one fp32 per 256 of them.
NF4_BYTES = (4 + 32 / 64) / 8
NF4_DQ_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8


def estimate(arch: tuple, chunked_loss: bool = False) -> dict[str, float]:
    """GiB of weights, adapter + AdamW, activations and logits for one training step (bf16 compute).
    `chunked_loss`: train.loss_impl chunked, which holds one chunk's logits at a time, not the micro-batch's."""
    from abba_cli.train.linear_cross_entropy import chunk_tokens

    h, i, layers, nq, nkv, d, vocab, tied, micro, seq, ckpt = arch
    shapes = [(nq * d, h), (nkv * d, h), (nkv * d, h), (h, nq * d), (i, h), (i, h), (h, i)]  # (out, in)
    linear = layers * sum(m * n for m, n in shapes)
    adapter = layers * sum((R1 + R2) * (m + n) for m, n in shapes)
    embed = vocab * h * (1 if tied else 2)  # lm_head is never quantized (transformers' choice)
    tokens = micro * seq
    logit_rows = (
        min(tokens, chunk_tokens(vocab)) if chunked_loss else tokens
    )  # rows whose logits exist at once
    # Elements saved per token and layer in bf16 (sdpa, no T x T scores): two RMSNorms (fp32 input copy, output:
    # ~4h each), q/k before RoPE, v, q after RoPE, k/v repeated to nq heads, attention output and its reshaped
    # copy (o_proj input), four (T, i) MLP tensors, and the Khatri-Rao path's (T, r1 r2) per adapted layer.
    per_layer = 8 * h + (nq + nkv) * d + nkv * d + nq * d + 2 * nq * d + 2 * nq * d + 4 * i + 7 * R1 * R2
    if ckpt:  # layer inputs kept, one layer recomputed at a time, plus its gradients
        act_elems = layers * h * tokens + 2 * per_layer * tokens
    else:
        act_elems = layers * per_layer * tokens
    gib = 2**30
    return {
        "params_B": (linear + embed) / 1e9,
        "bf16_weights": (linear + embed) * 2 / gib,
        "nf4_weights": (linear * NF4_BYTES + embed * 2) / gib,
        "nf4_dq_weights": (linear * NF4_DQ_BYTES + embed * 2) / gib,
        "adapter_adamw": adapter * 16 / gib,  # fp32 factor, fp32 gradient, two fp32 AdamW moments
        "activations": act_elems * 2 / gib,
        # bf16 logits, their fp32 copy, fp32 log-softmax saved by cross_entropy, fp32 gradient
        "logits": logit_rows * vocab * (2 + 4 + 4 + 4) / gib,
        "tokens": tokens,
        "checkpointing": ckpt,
    }


def estimate_table() -> str:
    lines = [
        "| config (tokens per micro-batch) | params | bf16 base | nf4 base | nf4 + double quant | "
        "adapter + AdamW | activations + logits | total, bf16 base | total, nf4 base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, arch in PAPER.items():
        e = estimate(arch)
        rest = e["adapter_adamw"] + e["activations"] + e["logits"]
        ck = ", checkpointing" if e["checkpointing"] else ""
        lines.append(
            f"| {name} ({e['tokens']}{ck}) | {e['params_B']:.2f} B | {e['bf16_weights']:.1f} | "
            f"{e['nf4_weights']:.1f} | {e['nf4_dq_weights']:.1f} | {e['adapter_adamw']:.2f} | "
            f"{e['activations'] + e['logits']:.1f} | {e['bf16_weights'] + rest:.1f} | {e['nf4_weights'] + rest:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimate", action="store_true", help="print the computed GPU memory table")
    parser.add_argument("--sizes", action="store_true", help="print each variant's base tensor MiB (exact)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.estimate:
        print(estimate_table())
        return
    if args.sizes:
        print(json.dumps(sizes()))
        return
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.micro, args.seq)))
        return
    result = measure(args.rounds, args.steps, args.micro, args.seq)
    common.write_json(common.RESULTS_DIR / "quant_smollm2_cpu.json", result)
    print(measured_table(result))
    print(json.dumps(result["machine"]))


if __name__ == "__main__":
    main()
