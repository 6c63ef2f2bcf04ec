"""One GPU call that needs no model transfer (issue 23.4): ABBA against LoRA where users run them.

A random-initialised Mistral-7B-shaped bf16 model (4096 wide, 14336 MLP, GQA 32/8, `--layers` decoder blocks;
32 is the real depth), so nothing but this checkout travels. Stages, each written to OUT/gpu_check.json as soon as
it finishes (a stage that fails or runs past `--budget-s` is recorded as such and the next one runs):

  errors    bf16 error of every ABBA path against float64 on the device: output, input gradient and every factor
            gradient, for 4096 x 4096 and 14336 x 4096 layers at 512 tokens
  shipped   the shipped 7B regime: micro-batch 1 x 512, gradient checkpointing, accumulation 4: ms per micro-batch,
            peak memory and the fraction of the step the GPU is busy, for no adapter, our LoRA, PEFT LoRA, ABBA
            `auto` and each forced path, each eager and under torch.compile
  batch8    micro-batch 8 x 512 without checkpointing, the same rows
  layers    the layer sweep (benchmarks/layer_sweep.py) at 512, 4096 and 8192 tokens, 10 repeats, with the fitted
            constants of `auto`'s cost model for this device
  decode    `abba eval`'s greedy generation: ms per decoded token at batch 8, 16 and 64, and the GSM8K time
            (1319 questions, 256 new tokens at most) that implies

    python benchmarks/gpu_check.py --out gpu_results            # on the GPU machine (about 8 minutes on an H200)
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_smoke  # the same stages on a CPU at tiny sizes (tests)

The device image lacks pydantic (abba_cli's config): carry its wheels as the device README says.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common, layer_sweep  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ABBA_PATHS = ["auto", "khatri_rao", "merged", "hybrid"]
VARIANTS = ["none", "lora", "peft_lora", *(f"abba_{p}" for p in ABBA_PATHS)]
# Full size: Mistral-7B's shapes. Smoke: the same stages on a model a CPU steps in milliseconds.
SIZES = {
    "full": dict(hidden=4096, inter=14336, heads=32, kv=8, vocab=32000, seq=512, r1=16, r2=16, r=32),
    "smoke": dict(hidden=64, inter=128, heads=4, kv=2, vocab=256, seq=16, r1=2, r2=2, r=4),
}
GSM8K_QUESTIONS, GSM8K_NEW_TOKENS = 1319, 256


# ----------------------------------------------------------------------------------------------- the model


def build_model(size: dict, layers: int, device: str) -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        hidden_size=size["hidden"],
        intermediate_size=size["inter"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv"],
        num_hidden_layers=layers,
        vocab_size=size["vocab"],
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM(cfg)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    return model.to(dtype)


def with_variant(base: Any, variant: str, size: dict) -> tuple[Any, Callable[[], Any]]:
    """(model carrying `variant`'s trainable parameters, a function that takes them off again)."""
    from abba_cli.adapters import inject_adapters
    from abba_cli.adapters.inject import remove_adapters
    from abba_cli.config import AdapterConfig

    if variant == "none":  # no adapter: the frozen model's own forward and backward (through its input grads)
        base.requires_grad_(False)
        hook = base.get_input_embeddings().register_forward_hook(
            lambda mod, inp, out: out.requires_grad_(True)
        )
        return base, hook.remove
    if variant == "peft_lora":
        from peft import LoraConfig, get_peft_model

        peft_cfg = LoraConfig(r=size["r"], lora_alpha=2 * size["r"], target_modules=TARGETS)
        model = get_peft_model(base, peft_cfg)
        return model, lambda: model.unload()
    originals = dict(base.named_modules())
    if variant == "lora":
        cfg = AdapterConfig(type="lora", r=size["r"], target_modules=TARGETS)
    else:
        path = variant.removeprefix("abba_")
        cfg = AdapterConfig(type="abba", r1=size["r1"], r2=size["r2"], path=path, target_modules=TARGETS)
    inject_adapters(base, cfg, seed=0)
    with torch.no_grad():  # a trained-looking B2 (0 at init changes no cost, but keep the update generic)
        for name, p in base.named_parameters():
            if name.endswith(".B2"):
                p.normal_(0, 1e-3)
    return base, lambda: remove_adapters(base, originals)


# ----------------------------------------------------------------------------------------------- stages


def stage_errors(args: Any, size: dict) -> dict[str, Any]:
    """bf16 autocast against a float64 evaluation of the same layer, for each exact path."""
    from abba_cli.adapters import ABBALinear

    shapes = [(size["hidden"], size["hidden"]), (size["inter"], size["hidden"])]
    out = {}
    for m, n in shapes:
        gen = torch.Generator().manual_seed(0)
        base = torch.nn.Linear(n, m, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.randn(m, n, generator=gen) / math.sqrt(n))
        x = torch.randn(1, size["seq"], n, generator=gen)
        dy = torch.randn(1, size["seq"], m, generator=gen)
        cell = {}
        for path in ABBA_PATHS[1:]:
            layer = ABBALinear(copy.deepcopy(base), size["r1"], size["r2"], scaling=16.0, path=path, seed=0)
            with torch.no_grad():
                layer.B2.normal_(0, 1e-2, generator=gen)
            cell[path] = _path_error(layer, x, dy, args.device)
        out[f"{m}x{n}"] = cell
    return out


def _path_error(layer: Any, x: torch.Tensor, dy: torch.Tensor, device: str) -> dict[str, float]:
    ref = copy.deepcopy(layer).double().to(device)
    got = layer.to(device)
    got.weight.data = got.weight.data.to(torch.bfloat16)  # frozen weights in bf16, factors fp32, as trained
    results = {}
    for name, mod, dtype in (("ref", ref, torch.float64), ("bf16", got, torch.bfloat16)):
        xi = x.to(device=device, dtype=dtype).requires_grad_(True)  # bf16 activations, as between bf16 layers
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = mod(xi)
        y.backward(dy.to(device=device, dtype=y.dtype))
        grads = {k: p.grad.double() for k, p in mod.factors().items()}
        results[name] = {"y": y.detach().double(), "dx": xi.grad.double(), **grads}
    rel = {
        k: float((results["bf16"][k] - v).norm() / v.norm().clamp_min(1e-30))
        for k, v in results["ref"].items()
    }
    return {
        "output": rel["y"],
        "input_grad": rel["dx"],
        "worst_factor_grad": max(rel[k] for k in ("B1", "A1", "B2", "A2")),
    }


def stage_steps(args: Any, size: dict, base: Any, batch: int, checkpointing: bool) -> dict[str, Any]:
    """ms per micro-batch, peak memory and GPU-busy fraction of one optimizer step of `args.accum` micro-batches."""
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()
    base.config.use_cache = False
    rows = {}
    for compiled in (False, True) if not args.no_compile else (False,):
        for variant in VARIANTS:
            name = f"{variant}{' compiled' if compiled else ''}"
            if time.perf_counter() - args.started > args.budget_s:
                rows[name] = {"skipped": f"budget of {args.budget_s} s spent"}
                continue
            try:
                rows[name] = _time_variant(args, size, base, variant, batch, compiled)
            except Exception as err:  # noqa: BLE001 - one variant's failure is a result, not the end of the stage
                rows[name] = {
                    "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                }
            print(f"  {name}: {rows[name]}", file=sys.stderr, flush=True)
    lora = rows.get("lora", {}).get("ms_per_micro_batch")
    for row in rows.values():
        if lora and "ms_per_micro_batch" in row:
            row["vs_our_lora"] = round(row["ms_per_micro_batch"] / lora, 3)
    return {
        "batch": batch,
        "seq": size["seq"],
        "accum": args.accum,
        "checkpointing": checkpointing,
        "rows": rows,
    }


def _time_variant(
    args: Any, size: dict, base: Any, variant: str, batch: int, compiled: bool
) -> dict[str, Any]:
    model, undo = with_variant(base, variant, size)
    try:
        model.train()
        runner = torch.compile(model, backend=args.compile_backend) if compiled else model
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5) if params else None
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, size["vocab"], (batch, size["seq"]), generator=gen).to(args.device)
        autocast = torch.autocast(
            torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.device != "cpu"
        )

        def step() -> None:
            for _ in range(args.accum):
                with autocast:
                    loss = runner(input_ids=ids, labels=ids).loss / args.accum
                loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        step()  # warm-up: compilation, optimizer state, allocator
        common.sync(args.device)
        first_s = time.perf_counter() - t0
        resting = common.reset_peak(args.device)
        times = [common.time_once(step, args.device) for _ in range(args.repeats)]
        peak = common.read_peak(args.device)
        busy = _busy_fraction(step, args.device)
    finally:
        undo()
    ms = statistics.median(times) * 1e3 / args.accum
    return {
        "ms_per_micro_batch": round(ms, 3),
        "min_max_ms": [round(min(times) * 1e3 / args.accum, 3), round(max(times) * 1e3 / args.accum, 3)],
        "first_step_s": round(first_s, 2),
        "peak_mib": round(common.mib(peak), 1),
        "peak_above_resting_mib": round(common.mib(max(peak - resting, 0)), 1),
        "gpu_busy": busy,
    }


def _busy_fraction(step: Callable[[], None], device: str) -> float | None:
    """Kernel time over wall time of one step (None on a CPU): well under 1 means launch-bound."""
    if device == "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    common.sync(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        common.sync(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
    return round(min(kernel_us / wall_us, 1.0), 3)


def stage_layers(args: Any, out_dir: Path) -> dict[str, Any]:
    """The layer sweep at the token counts users run, and this device's fitted cost-model constants."""
    import os

    # On a CPU layer_sweep re-executes itself to fix glibc's allocation thresholds (for its memory figures);
    # inside this process the thresholds only move those figures, so say they are set.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    argv = ["--device", args.device, "--dtype", "bf16" if args.device != "cpu" else "fp32", "--fit"]
    if args.smoke:
        argv += ["--shapes", "smollm2.q/o", "--ranks", "8", "--tokens", "16", "--repeats", "1"]
    else:
        argv += ["--shapes", "llama1b.q/o", "mistral7b.q/o", "mistral7b.gate/up", "--ranks", "16", "32", "64"]
        argv += ["--tokens", "512", "4096", "8192", "--repeats", "10"]
    res = layer_sweep.main([*argv, "--out", str(out_dir / "layer_sweep.json")])
    return {
        "fit": res.get("fit"),
        "auto_worst_regret_now": res["auto_worst_regret"],
        "cells": len(res["cells"]),
    }


def stage_decode(args: Any, size: dict, base: Any) -> dict[str, Any]:
    """Greedy decoding as `abba eval` runs it (KV cache, left-padded batch): ms per new token per batch size."""
    base.eval()
    base.config.use_cache = True
    rows = {}
    prompt_len, new = (200, 32) if not args.smoke else (8, 4)
    for batch in (8, 16, 64) if not args.smoke else (2,):
        ids = torch.randint(0, size["vocab"], (batch, prompt_len), generator=torch.Generator().manual_seed(0))
        ids = ids.to(args.device)
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            base.generate(input_ids=ids, **kw)  # warm-up
            one = {**kw, "max_new_tokens": 1, "min_new_tokens": 1}
            prefill = common.time_once(
                lambda ids=ids, one=one: base.generate(input_ids=ids, **one), args.device
            )
            total = common.time_once(lambda ids=ids, kw=kw: base.generate(input_ids=ids, **kw), args.device)
        per_token = (total - prefill) / (new - 1) * 1e3
        batches = math.ceil(GSM8K_QUESTIONS / batch)
        rows[str(batch)] = {
            "ms_per_decode_step": round(per_token, 3),
            "prefill_ms": round(prefill * 1e3, 1),
            "gsm8k_minutes_at_most": round(batches * (prefill + GSM8K_NEW_TOKENS * per_token / 1e3) / 60, 2),
        }
    return {"prompt_tokens": prompt_len, "rows": rows}


# ----------------------------------------------------------------------------------------------- driver


def run_stages(args: Any) -> dict[str, Any]:
    size = SIZES["smoke" if args.smoke else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": common.machine_info(args.device),
        "size": size,
        "layers": args.layers,
    }
    started = args.started = time.perf_counter()

    def record(name: str, fn: Callable[[], Any]) -> None:
        if time.perf_counter() - started > args.budget_s:
            report[name] = {"skipped": f"budget of {args.budget_s} s spent"}
        else:
            t0 = time.perf_counter()
            try:
                report[name] = {"result": fn(), "seconds": round(time.perf_counter() - t0, 1)}
            except Exception as err:  # noqa: BLE001 - keep the other stages' results
                report[name] = {"error": traceback.format_exc(limit=3), "type": type(err).__name__}
        common.write_json(
            args.out / "gpu_check.json", report
        )  # after every stage: nothing is lost to a timeout
        print(f"== {name}: {json.dumps(report[name])[:400]}", file=sys.stderr, flush=True)

    record("errors", lambda: stage_errors(args, size))
    base = build_model(size, args.layers, args.device)
    record("shipped", lambda: stage_steps(args, size, base, batch=1, checkpointing=True))
    record("batch8", lambda: stage_steps(args, size, base, batch=8, checkpointing=False))
    record("layers", lambda: stage_layers(args, args.out))
    record("decode", lambda: stage_decode(args, size, base))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.arg_parser(__doc__)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and the sweep's JSON")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (what the test suite runs)")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    p.add_argument("--layers", type=int, default=None, help="decoder blocks (default 32; 2 with --smoke)")
    p.add_argument(
        "--accum", type=int, default=4, help="micro-batches per optimizer step (the shipped configs: 4)"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed optimizer steps per row (default 5; 1 smoke)"
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default inductor; aot_eager with --smoke)",
    )
    p.add_argument("--budget-s", type=float, default=480, help="start no stage after this many seconds")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.layers = args.layers or (2 if args.smoke else 32)
    args.repeats = args.repeats or (1 if args.smoke else 5)
    # Smoke: every stage and row runs, at the least work that still runs it (one micro-batch; dynamo and AOT
    # autograd trace the compiled rows without inductor's C++ build).
    args.accum = args.accum or (1 if args.smoke else 4)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    return run_stages(args)


if __name__ == "__main__":
    main()
