"""Padding with and without data.group_by_length, the tokenized-data cache's start-up saving, and (optionally)
training tokens/s with and without grouping.

Counts (exact, machine-independent): for each bundled training source, tokenized with the SmolLM2 tokenizer as
`abba train` does, one epoch is cut into micro-batches in the order training uses (`epoch_order`, or
`length_grouped_order` with group_by_length) and the padding fraction is pad tokens / all tokens of the padded
batches.

Timings (indicative on a shared machine): `prepare_train_dataset` on the largest bundled source with an empty
cache, then again with the cache filled (a fresh $ABBA_HOME each round, so the first call really builds).
With --train-steps N, also N optimizer-free forward+backward micro-batches of SmolLM2 + ABBA per order, timed
round-robin (benchmarks/common.interleaved), reporting non-pad tokens/s.

    python -m experiments.data_padding [--batch-sizes 4 8 16] [--max-seq-len 512] [--cache-rounds 2]
                                      [--train-steps 0] [--write]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from typing import Any

from benchmarks import common
from experiments import RESULTS_DIR

SOURCES = ["commonsense_bundled_train", "gsm8k_bundled_train"]
LARGEST = "commonsense_bundled_train"  # 8 sets, 200 rows each held out: the largest bundled training source


def padding_fraction(lengths: list[int], order: list[int], batch: int) -> float:
    chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
    padded = sum(max(lengths[i] for i in c) * len(c) for c in chunks)
    return 1 - sum(lengths) / padded


def tokenized(recipe: str, tokenizer, max_seq_len: int):
    from abba_cli.config import DataConfig
    from abba_cli.data.training_set import prepare_train_dataset

    d = DataConfig(recipe=recipe, max_seq_len=max_seq_len, drop_long=True)
    return prepare_train_dataset(d, tokenizer, "SmolLM2-135M-Instruct")[0], d


def padding_rows(tokenizer, batch_sizes: list[int], max_seq_len: int, seed: int = 42) -> list[dict[str, Any]]:
    from abba_cli.data.order import epoch_order, length_grouped_order

    rows = []
    for recipe in SOURCES:
        ds, _ = tokenized(recipe, tokenizer, max_seq_len)
        lengths = list(ds["length"])
        for b in batch_sizes:
            random_pad = padding_fraction(lengths, epoch_order(len(lengths), seed, 0), b)
            grouped_pad = padding_fraction(lengths, length_grouped_order(lengths, seed, 0, b), b)
            rows.append(
                {
                    "source": recipe,
                    "examples": len(lengths),
                    "mean_len": sum(lengths) / len(lengths),
                    "max_len": max(lengths),
                    "micro_batch": b,
                    "padding_random": random_pad,
                    "padding_grouped": grouped_pad,
                }
            )
            print(f"{recipe} b={b}: padding {random_pad:.1%} -> {grouped_pad:.1%}", file=sys.stderr)
    return rows


def cache_startup(tokenizer, max_seq_len: int, rounds: int) -> dict[str, Any]:
    import time

    cold, warm = [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as home:
            os.environ["ABBA_HOME"] = home
            t0 = time.perf_counter()
            tokenized(LARGEST, tokenizer, max_seq_len)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ds, _ = tokenized(LARGEST, tokenizer, max_seq_len)
            warm.append(time.perf_counter() - t0)
    return {
        "source": LARGEST,
        "examples": len(ds),
        "cold_s": common.summary(cold),
        "cached_s": common.summary(warm),
    }


def train_tokens_per_s(tokenizer, batch: int, max_seq_len: int, steps: int) -> dict[str, Any]:
    import torch

    from abba_cli.adapters import inject_adapters
    from abba_cli.config import AdapterConfig
    from abba_cli.data.collate import make_collator
    from abba_cli.data.order import epoch_order, length_grouped_order

    ds, _ = tokenized(LARGEST, tokenizer, max_seq_len)
    lengths = list(ds["length"])
    model = common.load_smollm2()
    inject_adapters(model, AdapterConfig(type="abba", r1=16, r2=16), seed=0)
    collate = make_collator(tokenizer)
    orders = {
        "random": epoch_order(len(ds), 42, 0),
        "grouped": length_grouped_order(lengths, 42, 0, batch),
    }
    cursor = dict.fromkeys(orders, 0)
    real = {name: [] for name in orders}

    def step(name: str):
        def run():
            i = cursor[name]
            idx = orders[name][i * batch : (i + 1) * batch]
            cursor[name] += 1
            b = collate([ds[j] for j in idx])
            real[name].append(int(b["attention_mask"].sum()))
            model(**b).loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    torch.manual_seed(0)
    times = common.interleaved({n: step(n) for n in orders}, repeats=steps, device="cpu", warmup=1)
    out = {}
    for name, ts in times.items():
        toks = real[name][1:]  # the warm-up step is not timed
        out[name] = {"tokens_per_s": sum(toks) / sum(ts), "median_step_s": statistics.median(ts)}
    return out


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--cache-rounds", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=0, help="timed micro-batches per order (0: skip)")
    ap.add_argument("--write", action="store_true", help="write experiments/results/data_padding.json")
    args = ap.parse_args()

    tokenizer = common.load_smollm2_tokenizer()
    result: dict[str, Any] = {"machine": common.machine_info(), "max_seq_len": args.max_seq_len}
    with tempfile.TemporaryDirectory() as home:
        os.environ["ABBA_HOME"] = home
        result["padding"] = padding_rows(tokenizer, args.batch_sizes, args.max_seq_len)
    if args.cache_rounds:
        result["cache"] = cache_startup(tokenizer, args.max_seq_len, args.cache_rounds)
    if args.train_steps:
        with tempfile.TemporaryDirectory() as home:
            os.environ["ABBA_HOME"] = home
            result["train"] = train_tokens_per_s(tokenizer, 8, args.max_seq_len, args.train_steps)
    table = common.md_table(
        ["source", "examples", "mean len", "micro-batch", "padding (shuffled)", "padding (group_by_length)"],
        [
            [
                r["source"],
                r["examples"],
                r["mean_len"],
                r["micro_batch"],
                f"{r['padding_random']:.1%}",
                f"{r['padding_grouped']:.1%}",
            ]
            for r in result["padding"]
        ],
    )
    print(table)
    if "cache" in result:
        c = result["cache"]
        print(
            f"\n{c['source']} ({c['examples']} examples) start-up: {c['cold_s']['median']:.1f} s tokenizing, "
            f"{c['cached_s']['median']:.1f} s from the cache (median of {c['cold_s']['n']})"
        )
    if args.write:
        common.write_json(RESULTS_DIR / "data_padding.json", result)
    print(__import__("json").dumps(result))


if __name__ == "__main__":
    main()
