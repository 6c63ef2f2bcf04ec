"""Mean per-token response loss of trained runs on a fixed held-out slice of the commonsense sets.

The selection metric of the 2026-12-02 scale / learning-rate sweep (benchmarks/RESULTS.md "ABBA vs LoRA"):
rows [skip, skip + limit) of each eval recipe (default [150, 158): inside the 200 rows
commonsense_bundled_train never trains on, and outside the [0, 50) slice that `abba eval` reports), rendered and
masked exactly as training renders them. The loss is written out here in plain torch (sum of next-token cross-entropy over response tokens / their count) rather than
through abba_cli.train, so it also cross-checks the `val_loss` that training logs.

    python -m experiments.heldout_loss runs/compare/sweep/* --out experiments/results/compare_smollm2_commonsense_sweep_cpu.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common

TASKS = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"]


def heldout_examples(tasks: list[str], skip: int, limit: int) -> list:
    from abba_cli.data.recipes import load_examples

    return [e for t in tasks for e in load_examples(t, skip=skip, limit=limit, source="bundled")]


@torch.no_grad()
def response_loss(model, tokenizer, examples, max_seq_len: int, batch_size: int = 8) -> tuple[float, int]:
    """(mean loss per response token, number of response tokens)."""
    from abba_cli.data.collate import make_collator
    from abba_cli.data.tokenize import build_train_dataset

    dataset = build_train_dataset(examples, tokenizer, max_seq_len)
    collate = make_collator(tokenizer)
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        keep = targets != -100  # only response positions: the prompt's logits are never needed in float64
        picked = logits[:, :-1][keep].double()  # (response tokens, vocab)
        total += float(F.cross_entropy(picked, targets[keep], reduction="sum"))
        count += int(keep.sum())
    return total / count, count


def run_loss(run_dir: Path, examples, max_seq_len: int) -> dict:
    import yaml

    from abba_cli.adapters import load_adapter
    from abba_cli.models.loading import load_base

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    model, tokenizer = load_base(cfg["model"]["name_or_path"], cfg["model"]["dtype"])
    if (run_dir / "adapter_config.json").is_file():
        load_adapter(model, run_dir)
    loss, tokens = response_loss(model, tokenizer, examples, max_seq_len)
    return {
        "run": str(run_dir),
        "heldout_loss": loss,
        "response_tokens": tokens,
        "adapter": cfg["adapter"],
        "lr": cfg["train"]["lr"],
        "steps": cfg["train"]["max_steps"],
        "seed": cfg["train"]["seed"],
    }


def main(argv: list[str] | None = None) -> None:
    p = common.arg_parser(__doc__)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (with config.yaml)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--skip", type=int, default=150)
    p.add_argument("--limit", type=int, default=8, help="rows per task")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = p.parse_args(argv)
    examples = heldout_examples(args.tasks.split(","), args.skip, args.limit)
    print(
        f"{len(examples)} held-out examples: rows [{args.skip}, {args.skip + args.limit}) of {args.tasks}",
        file=sys.stderr,
    )
    results = []
    for run in args.runs:
        r = run_loss(run, examples, args.max_seq_len)
        results.append(r)
        print(f"{r['heldout_loss']:.4f}  {run}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
