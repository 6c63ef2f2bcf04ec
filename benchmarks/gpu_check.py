"""The GPU measurements that need no model transfer: random-initialised Mistral-7B-shaped bf16 layers.

Stages, each written to the results JSON as it finishes (a timeout loses at most the stage it was in; a stage that
fails records its error and the next one runs):
- bf16_error: per-path bf16-autocast error of one adapted layer against float64 (output, dx, every factor
  gradient) at the 4096 x 4096 and 14336 x 4096 shapes, 512 tokens; our LoRA for comparison.
- step_1x512 (8 decoder layers): the paper configs' regime (micro-batch 1 x 512, gradient checkpointing, accumulation 4): ms per micro-batch,
  peak memory and the fraction of the step the GPU is busy (kernel time / wall time, from the profiler), for no
  adapter, our LoRA, PEFT LoRA, ABBA `auto` and each forced path; the --compile variants also compiled.
- step_8x512: micro-batch 8 x 512 without checkpointing, the same rows.
- step_packed_1x4096: one packed row of 4,096 tokens per micro-batch (examples of 64-512 tokens, position ids
  restarting per example, the attention backend isolating them; no attention mask) with the chunked loss, as
  `abba train` runs data.packing with train.loss_impl chunked: PEFT LoRA, our LoRA and ABBA, no checkpointing.
- loss_impls: train.loss_impl full, chunked, cce and liger (where installed) on a Llama-3.2-1B-shaped head, each
  against chunked: loss and gradient errors, time and peak memory (benchmarks/gpu_loss_impls.py).
- layers: one layer forward + backward per path at 512, 4096 and 8192 tokens, timed with CUDA events (>= 10
  repeats), the launches each path ran, and the `auto` constants fitted on them (layer_sweep's fitter).
- decode (all 32 layers): greedy decode ms per step at batch 8, 16 and 64 (as `abba eval` generates, adapter
  merged: plain Linear layers), and the GSM8K and MATH times it implies (1319 and 5000 questions, every batch to
  512 new tokens: an upper bound).

`--smoke` runs every stage on the CPU at tiny sizes (tests/benchmarks/test_bench_gpu_check.py), so GPU time is
never spent on a script that has not run.

    python -m benchmarks.gpu_check --out gpu_check.json                  # on the GPU: needs torch, transformers, peft
    python -m benchmarks.gpu_check --smoke --out /tmp/smoke.json         # CPU, about a minute
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks import common
from benchmarks import layer_sweep as sweep
from benchmarks.gpu_loss_impls import stage_loss_impls
from benchmarks.op_count import OpCounter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["none", "lora", "peft_lora", "abba", "abba_merged", "abba_khatri_rao", "abba_hybrid"]
STAGES = ["bf16_error", "step_1x512", "step_8x512", "step_packed_1x4096", "loss_impls", "layers", "decode"]
GSM8K_QUESTIONS, GSM8K_NEW_TOKENS = 1319, 512
MATH_QUESTIONS, MATH_NEW_TOKENS = 5000, 512

SIZES = {
    "full": dict(
        width=4096, inter=14336, heads=32, kv=8, layers=8, decode_layers=32, vocab=32000, seq=512, big_batch=8, accum=4,
        packed_seq=4096, packed_example_tokens=(64, 512),
        rounds=5, err_shapes=[(4096, 4096), (14336, 4096)], err_tokens=512,
        layer_shapes={"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)},
        layer_ranks=[16, 32, 64], layer_tokens=[512, 4096, 8192], layer_repeats=10,
        decode_batches=[8, 16, 64], decode_prompt=128, decode_new=32,
    ),
    "smoke": dict(
        width=64, inter=160, heads=4, kv=2, layers=2, decode_layers=2, vocab=256, seq=32, big_batch=2, accum=2,
        packed_seq=64, packed_example_tokens=(4, 24),
        rounds=1, err_shapes=[(64, 64), (160, 64)], err_tokens=32,
        layer_shapes={"q/o": (64, 64), "gate/up": (160, 64)},
        layer_ranks=[8], layer_tokens=[16, 64], layer_repeats=2,
        decode_batches=[2, 4], decode_prompt=8, decode_new=4,
    ),
}  # fmt: skip


def build_base(sz: dict, device: str, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=sz["width"],
        intermediate_size=sz["inter"],
        num_attention_heads=sz["heads"],
        num_key_value_heads=sz["kv"],
        num_hidden_layers=layers,
        vocab_size=sz["vocab"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


def make_variant(base, name: str):
    """(model, trainable params): ABBA r1 = r2 = 16 against LoRA r = 32 (the same parameter budget)."""
    from abba_cli.adapters import inject_adapters
    from abba_cli.config import AdapterConfig

    model = copy.deepcopy(base)
    if name == "none":
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # the frozen model's own full backward
    elif name == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=TARGETS))
    else:
        kind = "abba" if name.startswith("abba") else "lora"
        extra: dict[str, Any] = {"r1": 16, "r2": 16} if kind == "abba" else {"r": 32}
        if name.startswith("abba_"):
            extra["path"] = name.removeprefix("abba_")
        inject_adapters(model, AdapterConfig(type=kind, target_modules=TARGETS, **extra), seed=0)
    with torch.no_grad():  # a generic update: B2 / B random (zero at init changes no cost, but be general)
        for n, p in model.named_parameters():
            if n.endswith(("B2", ".B")) or "lora_B" in n:
                p.normal_(0, 1e-3)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def stage_bf16_error(sz: dict, device: str) -> list[dict[str, Any]]:
    from torch import nn

    from abba_cli.adapters import ABBALinear, LoRALinear

    rows = []
    for m, n in sz["err_shapes"]:
        gen = torch.Generator().manual_seed(m + n)
        x = torch.randn(sz["err_tokens"], n, generator=gen).to(device)
        dy = torch.randn(sz["err_tokens"], m, generator=gen).to(device)
        for path in ["lora", "khatri_rao", "merged", "hybrid"]:
            torch.manual_seed(0)
            base = nn.Linear(n, m, bias=False, device=device).to(torch.bfloat16)
            layer = LoRALinear(base, 32, 2.0) if path == "lora" else ABBALinear(base, 16, 16, 1.0, path=path)
            with torch.no_grad():
                for p in layer.factors().values():
                    p.copy_(torch.randn(p.shape, generator=gen).to(device) * n**-0.25)
            xb = x.clone().requires_grad_(True)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                y = layer(xb)
            y.backward(dy.to(y.dtype))
            f = {k: v.detach().double().requires_grad_(True) for k, v in layer.factors().items()}
            if path == "lora":
                dw = layer.scaling * f["B"] @ f["A"]
            else:
                dw = layer.scaling * (f["B1"] @ f["A1"]) * (f["B2"] @ f["A2"])
            xr = x.double().requires_grad_(True)
            yr = xr @ (layer.weight.double() + dw).T
            yr.backward(dy.double())
            errs = {"y": _rel(y, yr), "dx": _rel(xb.grad, xr.grad)}
            errs |= {f"d{k}": _rel(v.grad, f[k].grad) for k, v in layer.factors().items()}
            rows.append({"m": m, "n": n, "tokens": sz["err_tokens"], "path": path, "rel_err": errs})
            del layer, base
    return rows


def _busy_fraction(step, device: str) -> float | None:
    """Kernel time / wall time of one step, from the profiler (None on the CPU: no kernels to time apart)."""
    if torch.device(device).type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    common.sync(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        common.sync(device)
    wall = time.perf_counter() - t0
    kernel_us = sum(e.self_device_time_total for e in prof.events())
    return kernel_us * 1e-6 / wall


def step_rows(sz: dict, device: str, base, batch: int, ckpt: bool, compile_variants: list[str], backend: str):
    """ms per micro-batch, peak memory and GPU busy fraction of each variant, eager and (some) compiled."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, sz["vocab"], (sz["accum"], batch, sz["seq"]), generator=gen).to(device)

    def loss(model, micro) -> torch.Tensor:  # transformers' own loss: the mean over the micro-batch's tokens
        return model(input_ids=micro, labels=micro).loss / len(ids)

    return _timed_steps(sz, device, base, list(ids), loss, VARIANTS, ckpt, compile_variants, backend)


def packed_micro_batches(sz: dict, device: str) -> tuple[list[dict], float]:
    """`accum` packed rows of sz["packed_seq"] tokens, as abba's PackedCollator builds them (position ids
    restarting per example, each example's first label ignored), from seeded example lengths of
    MetaMathQA-like size; the attention backend isolates the examples from the position ids. Also returns the
    mean examples per row."""
    from abba_cli.data.packing import PackedCollator, pack_rows

    gen = torch.Generator().manual_seed(1)
    row = sz["packed_seq"]
    lo, hi = sz["packed_example_tokens"]
    lengths = torch.randint(lo, hi + 1, (sz["accum"] * row // lo,), generator=gen).tolist()
    packed = pack_rows(lengths, row, seed=0)[: sz["accum"]]  # full rows first (first-fit decreasing)
    collate = PackedCollator(pad_token_id=0, max_len=row)
    micros = []
    for examples in packed:
        rows = [[{"input_ids": (ids := torch.randint(1, sz["vocab"], (lengths[i],), generator=gen).tolist()),
                  "labels": ids} for i in examples]]  # fmt: skip
        batch = collate(rows)
        micros.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return micros, sum(map(len, packed)) / len(packed)


def packed_step_rows(sz: dict, device: str, base) -> list[dict[str, Any]]:
    """1 packed row x sz["packed_seq"] tokens per micro-batch with the chunked loss normalised by the step's
    target tokens (as abba train runs data.packing with train.loss_impl chunked): PEFT LoRA, our LoRA, ABBA."""
    from abba_cli.train.loss import count_targets, micro_batch_loss

    micros, per_row = packed_micro_batches(sz, device)
    targets = sum(count_targets(m["labels"]) for m in micros)

    def loss(model, micro) -> torch.Tensor:
        return micro_batch_loss(model, micro, "chunked") / targets

    rows = _timed_steps(sz, device, base, micros, loss, ["peft_lora", "lora", "abba"], False, [], "inductor")
    for r in rows:
        r |= {"tokens_per_row": sz["packed_seq"], "examples_per_row": per_row,
              "attn_implementation": base.config._attn_implementation}  # fmt: skip
    return rows


def _timed_steps(sz, device, base, micros, loss_fn, variants, ckpt, compile_variants, backend) -> list[dict]:
    from abba_cli.adapters import compile_model

    dev_type = torch.device(device).type
    rows = []
    for name in variants:
        for compiled in [False, True] if name in compile_variants else [False]:
            model, params = make_variant(base, name)
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            if compiled:
                compile_model(model, backend=backend)
            opt = torch.optim.AdamW(params, lr=1e-5)

            def step(model=model, opt=opt) -> None:
                for micro in micros:  # accumulation: one optimizer step per `accum` micro-batches
                    with torch.autocast(dev_type, dtype=torch.bfloat16):
                        loss = loss_fn(model, micro)
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            t0 = time.perf_counter()
            step()  # warm-up (and compilation)
            first_s = time.perf_counter() - t0
            resting = common.reset_peak(device)
            times = [common.time_once(step, device) for _ in range(sz["rounds"])]
            peak = common.read_peak(device) - resting
            busy = _busy_fraction(step, device)
            ms = statistics.median(times) * 1e3 / len(micros)
            rows.append(
                {"variant": name, "compiled": compiled, "ms_per_micro_batch": ms, "peak_step_bytes": peak,
                 "gpu_busy": busy, "first_step_s": first_s, "times_s": times}
            )  # fmt: skip
            print(f"  {name}{' compiled' if compiled else ''}: {ms:.1f} ms/micro-batch", file=sys.stderr)
            del model, opt, params, step
            gc.collect()
            if dev_type == "cuda":
                torch.cuda.empty_cache()
    lora = {r["compiled"]: r["ms_per_micro_batch"] for r in rows if r["variant"] == "peft_lora"}
    for r in rows:
        r["vs_peft_lora"] = r["ms_per_micro_batch"] / lora[False] if lora else None
    return rows


def _event_timer(device: str):
    if torch.device(device).type != "cuda":
        return lambda fn: common.time_once(fn, device)

    def timed(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3

    return timed


def stage_layers(sz: dict, device: str) -> dict[str, Any]:
    """Layer cells in layer_sweep's format (so `layer_sweep.py --refit` reads them), timed with CUDA events."""
    timed = _event_timer(device)
    cells = []
    for shape, (m, n) in sz["layer_shapes"].items():
        for r in sz["layer_ranks"]:
            for tokens in sz["layer_tokens"]:
                w, x, dy, abba_f, lora_f = sweep._cell_inputs(m, n, r, tokens, device, torch.bfloat16)
                fns = sweep._runners(w, x, dy, abba_f, lora_f)
                launches = {}
                for key, fn in fns.items():
                    fn()  # warm-up
                    with OpCounter() as counter:
                        fn()
                    launches[key] = counter.total
                times = common.round_robin(
                    {k: (lambda fn=fn: timed(fn)) for k, fn in fns.items()}, sz["layer_repeats"]
                )
                med = {k: statistics.median(v) for k, v in times.items()}
                cells.append(
                    {"shape": shape, "m": m, "n": n, "r": r, "r1": r // 2, "r2": r // 2, "tokens": tokens,
                     "dropout": False, "repeats": sz["layer_repeats"], "times": times, "median": med,
                     "peak_bytes": {k: 0 for k in med}, "launches": launches}
                )  # fmt: skip
                del w, x, dy, abba_f, lora_f, fns
    fit = sweep.fit_costs(cells)
    return {"cells": cells, "fit": fit, "table": sweep.to_markdown(cells, fit)}


def stage_decode(sz: dict, device: str, base) -> list[dict[str, Any]]:
    model = base.eval()
    rows = []
    for batch in sz["decode_batches"]:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(1, sz["vocab"], (batch, sz["decode_prompt"]), generator=gen).to(device)

        def run(new: int, ids=ids) -> None:
            with torch.inference_mode():
                model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                    do_sample=False, pad_token_id=0,
                )  # fmt: skip

        run(2)  # warm-up
        one = statistics.median(common.time_once(lambda: run(1), device) for _ in range(3))
        full = statistics.median(common.time_once(lambda: run(sz["decode_new"]), device) for _ in range(3))
        step_ms = (full - one) * 1e3 / (sz["decode_new"] - 1)
        gsm8k_min = math.ceil(GSM8K_QUESTIONS / batch) * (one + GSM8K_NEW_TOKENS * step_ms * 1e-3) / 60
        math_min = math.ceil(MATH_QUESTIONS / batch) * (one + MATH_NEW_TOKENS * step_ms * 1e-3) / 60
        rows.append(
            {"batch": batch, "prefill_s": one, "decode_ms_per_step": step_ms, "gsm8k_upper_min": gsm8k_min,
             "math_upper_min": math_min}
        )  # fmt: skip
        print(
            f"  decode batch {batch}: {step_ms:.1f} ms/step, GSM8K <= {gsm8k_min:.1f} min, MATH <= {math_min:.1f} min",
            file=sys.stderr,
        )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = common.arg_parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="every stage on the CPU at tiny sizes")
    p.add_argument("--device", help="default: cuda, or cpu with --smoke")
    p.add_argument("--layers", type=int, help="decoder layers of the training-step model (default 8)")
    p.add_argument("--stages", nargs="+", default=STAGES)
    p.add_argument(
        "--compile", nargs="*", help="variants also timed compiled (default: lora abba; --smoke: abba)"
    )
    p.add_argument("--backend", help="torch.compile backend (default inductor; aot_eager with --smoke)")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sz = SIZES["smoke" if args.smoke else "full"]
    device = args.device or ("cpu" if args.smoke else "cuda")
    backend = args.backend or ("aot_eager" if args.smoke else "inductor")
    layers = args.layers or sz["layers"]
    compile_variants = (
        args.compile if args.compile is not None else (["abba"] if args.smoke else ["lora", "abba"])
    )
    res: dict[str, Any] = {"config": {**vars(args), "out": str(args.out), "layers": layers, "sizes": sz},
                           "machine": common.machine_info(device), "stages": {}}  # fmt: skip
    common.write_json(args.out, res)
    steps = {"step_1x512", "step_8x512", "step_packed_1x4096"}
    base = build_base(sz, device, layers) if steps & set(args.stages) else None
    stages = {
        "bf16_error": lambda: stage_bf16_error(sz, device),
        "step_1x512": lambda: step_rows(sz, device, base, 1, True, compile_variants, backend),
        "step_8x512": lambda: step_rows(sz, device, base, sz["big_batch"], False, compile_variants, backend),
        "step_packed_1x4096": lambda: packed_step_rows(sz, device, base),
        "loss_impls": lambda: stage_loss_impls(args.smoke, device),
        "layers": lambda: stage_layers(sz, device),
        "decode": lambda: stage_decode(sz, device, build_base(sz, device, sz["decode_layers"])),
    }
    for name in args.stages:
        print(f"stage {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            res["stages"][name] = {"result": stages[name](), "seconds": time.perf_counter() - t0}
        except Exception as err:  # noqa: BLE001 - one failed stage must not lose the others
            res["stages"][name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
            print(f"stage {name} failed: {err}", file=sys.stderr)
        common.write_json(args.out, res)  # after every stage: a timeout loses at most the current one
    return res


if __name__ == "__main__":
    main()
