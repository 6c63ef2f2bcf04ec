"""Generation speed with an ABBA adapter merged in memory against the base model (SmolLM2-135M, greedy).

Three models in one process, timed round-robin: the base; base + a random ABBA adapter (r1 = r2 = 16, all seven
projections) merged and unwrapped into plain nn.Linear layers, as `abba eval` does; with --with-unmerged also the
same adapter left unmerged (every projection runs the adapter's forward), to show what merging buys. Every generation produces
exactly --new-tokens tokens per prompt (min_new_tokens = max_new_tokens), so tokens/s compare like for like.

    python -m benchmarks.eval_speed [--new-tokens 32] [--repeats 3] [--dtype fp32]
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks import common

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in two sentences.",
    "What is the capital of France, and what river flows through it?",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted(base, merge: bool):
    from abba_cli.adapters import inject_adapters, merge_adapters, unwrap_adapters
    from abba_cli.config import AdapterConfig

    model = copy.deepcopy(base)
    inject_adapters(model, AdapterConfig(type="abba", r1=16, r2=16, target_modules=TARGETS), seed=0)
    with torch.no_grad():  # a non-zero update, so the merged weights really differ from the base
        for name, p in model.named_parameters():
            if name.endswith("B2"):
                p.normal_(0, 1e-3)
    if merge:
        merge_adapters(model)
        unwrap_adapters(model)
    return model.eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.arg_parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=list(common.DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--with-unmerged",
        action="store_true",
        help="also time the adapter left unmerged (slow: it rebuilds every W0 + dW at every decoding step)",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    tok = common.load_smollm2_tokenizer()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base = common.load_smollm2(common.DTYPES[args.dtype], args.device).eval()
    models = {"base": base, "abba_merged": adapted(base, True)}
    if args.with_unmerged:
        models["abba_unmerged"] = adapted(base, False)
    batch = tok(PROMPTS, return_tensors="pt", padding=True).to(args.device)
    n_new = args.new_tokens * len(PROMPTS)

    def runner(model):
        def go() -> None:
            with torch.inference_mode():
                model.generate(
                    **batch,
                    do_sample=False,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    pad_token_id=tok.pad_token_id,
                )

        return go

    times = common.interleaved({k: runner(m) for k, m in models.items()}, args.repeats, args.device)
    rows = []
    for name, ts in times.items():
        r_med, r_lo, r_hi = common.ratio_spread(times["base"], ts)  # tokens/s ratio = base time / time
        rows.append(
            {
                "variant": name,
                "tokens_per_s": n_new / statistics.median(ts),
                "time": common.summary(ts),
                "speed_vs_base": {"median": r_med, "min": r_lo, "max": r_hi},
            }
        )
    res = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "machine": common.machine_info(),
        "rows": rows,
    }
    return common.finish(res, args.out, to_markdown(res))


def to_markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    head = (
        f"SmolLM2-135M {cfg['dtype']} on {cfg['device']}, greedy, {len(PROMPTS)} prompts batched (left padding), "
        f"{cfg['new_tokens']} new tokens each, {cfg['repeats']} interleaved rounds"
    )
    rows = [
        [
            r["variant"],
            f"{r['tokens_per_s']:.1f}",
            f"{r['time']['median']:.2f} ({r['time']['min']:.2f}..{r['time']['max']:.2f})",
            f"{r['speed_vs_base']['median']:.3f} ({r['speed_vs_base']['min']:.2f}..{r['speed_vs_base']['max']:.2f})",
        ]
        for r in res["rows"]
    ]
    return (
        head + "\n\n" + common.md_table(["model", "tokens/s", "s per batch (min..max)", "speed / base"], rows)
    )


if __name__ == "__main__":
    main()
