"""Toy transfer (the ABBA paper's Figure 1, right): adapt an MLP pre-trained on digits 0-7 to digits 8 and 9.

The paper uses MNIST; we use scikit-learn's bundled 8x8 digits (offline, 1797 images) so this runs anywhere.

Task design:
- Pre-training: a 2-layer MLP 64 -> hidden -> 10 (`fc1`, `fc2`) on digits 0-7 only. Logits 8 and 9 exist
  but are never a target, so the network learns to keep them low.
- Transfer: train on images of 8 and 9 with their true labels, still through the same 10-way head and a
  10-way cross-entropy, and score 10-way argmax accuracy on held-out 8s and 9s. The model must both raise
  logits 8/9 above the eight classes it knows and separate 8 from 9. We keep the 10-way head (rather than a
  fresh binary head) because that is the paper's setting and because it makes the update touch both layers:
  fc2 must learn two new output rows and fc1 features that tell 8 from 9. We also report accuracy on the
  held-out 0-7 images after transfer (forgetting), which the transfer loss never sees.
- Methods at an equal trainable-parameter budget, adapters on fc1 and fc2: LoRA rank r, HiRA rank r, ABBA
  r1 = r2 = r/2 (all (m+n) r parameters per layer), and full fine-tuning as the reference.
- Learning rate per method: a small sweep scored by mean final validation loss (a split of the 8/9 training
  images) over separate sweep seeds; the chosen rate then runs on the reported seeds.

    python -m experiments.toy_transfer            # full: LR sweep + 5 seeds (about a minute on 2 cores)
    python -m experiments.toy_transfer --quick    # a few steps, one seed, fixed LRs
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common
from experiments import RESULTS_DIR

METHODS = ("abba", "lora", "hira", "full")
LR_GRID = {
    "abba": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "lora": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "hira": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "full": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
}


# ----------------------------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Split:
    x: torch.Tensor  # (N, 64), pixel values scaled to [0, 1]
    y: torch.Tensor  # (N,), digit labels 0-9


@dataclass
class Data:
    pre_train: Split  # digits 0-7
    pre_test: Split
    new_train: Split  # digits 8-9 used to fit the adapters
    new_val: Split  # digits 8-9 used to choose learning rates
    new_test: Split  # digits 8-9, reported


def load_data(split_seed: int = 0) -> Data:
    """One fixed split (seeds vary the models, not the test set): 70/30 stratified, then 20% of the
    8/9 training images held out for the learning-rate sweep."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=split_seed)

    def sel(xs: np.ndarray, ys: np.ndarray, new: bool) -> Split:
        mask = ys >= 8 if new else ys < 8
        return Split(torch.from_numpy(xs[mask]), torch.from_numpy(ys[mask]).long())

    new_tr = sel(xtr, ytr, True)
    xa, xb, ya, yb = train_test_split(
        new_tr.x.numpy(), new_tr.y.numpy(), test_size=0.2, stratify=new_tr.y.numpy(), random_state=split_seed
    )
    return Data(
        pre_train=sel(xtr, ytr, False),
        pre_test=sel(xte, yte, False),
        new_train=Split(torch.from_numpy(xa), torch.from_numpy(ya)),
        new_val=Split(torch.from_numpy(xb), torch.from_numpy(yb)),
        new_test=sel(xte, yte, True),
    )


class MLP(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def pretrain(data: Data, hidden: int, seed: int, epochs: int = 60) -> MLP:
    torch.manual_seed(seed)
    model = MLP(hidden)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    x, y = data.pre_train.x, data.pre_train.y
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    """(10-way cross-entropy, 10-way argmax accuracy)."""
    model.eval()
    logits = model(split.x)
    model.train()
    return float(F.cross_entropy(logits, split.y)), float((logits.argmax(1) == split.y).float().mean())


# ----------------------------------------------------------------------------------------------------------
# Transfer
# ----------------------------------------------------------------------------------------------------------


def prepare(base: MLP, method: str, r: int, seed: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """A copy of the pre-trained model with the method applied; returns it and its trainable parameters."""
    model = copy.deepcopy(base)
    if method == "full":
        return model, list(model.parameters())
    from abba_cli.adapters import inject_adapters
    from abba_cli.config import AdapterConfig

    if method == "abba":
        cfg = AdapterConfig(type="abba", r1=r // 2, r2=r // 2, target_modules=["fc1", "fc2"])
    else:
        cfg = AdapterConfig(type=method, r=r, target_modules=["fc1", "fc2"])
    inject_adapters(model, cfg, seed=seed)  # freezes everything but the adapter factors
    return model, [p for p in model.parameters() if p.requires_grad]


@dataclass
class RunResult:
    method: str
    lr: float
    seed: int
    trainable: int
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # mean minibatch loss since the last log point
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    val_loss: float = math.nan
    val_acc: float = math.nan
    old_acc: float = math.nan  # accuracy on held-out digits 0-7 after transfer (forgetting)


def transfer(
    base: MLP,
    data: Data,
    method: str,
    r: int,
    lr: float,
    seed: int,
    steps: int,
    batch_size: int = 32,
    log_every: int = 5,
) -> RunResult:
    model, params = prepare(base, method, r, seed)
    res = RunResult(method, lr, seed, sum(p.numel() for p in params))
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(10_000 + seed)  # same batch order for every method at a seed
    x, y = data.new_train.x, data.new_train.y
    order = torch.randperm(len(y), generator=gen)
    pos, running = 0, []

    def log(step: int) -> None:
        tl, ta = evaluate(model, data.new_test)
        res.steps.append(step)
        res.train_loss.append(statistics.fmean(running) if running else evaluate(model, data.new_train)[0])
        res.test_loss.append(tl)
        res.test_acc.append(ta)
        running.clear()

    log(0)
    for step in range(1, steps + 1):
        if pos + batch_size > len(y):  # reshuffle each epoch
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        running.append(loss.item())
        if step % log_every == 0 or step == steps:
            log(step)
    res.val_loss, res.val_acc = evaluate(model, data.new_val)
    res.old_acc = evaluate(model, data.pre_test)[1]
    return res


def run_seed(
    seed: int, data: Data, methods: tuple[str, ...], lrs: dict[str, float], r: int, hidden: int, steps: int
) -> tuple[dict[str, RunResult], float]:
    """One pre-training at `seed`, then every method from that same starting point. Also returns the
    pre-trained model's accuracy on held-out digits 0-7 (the reference for forgetting)."""
    base = pretrain(data, hidden, seed)
    results = {m: transfer(base, data, m, r, lrs[m], seed, steps) for m in methods}
    return results, evaluate(base, data.pre_test)[1]


def sweep_lrs(
    data: Data, methods: tuple[str, ...], r: int, hidden: int, steps: int, seeds: list[int]
) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """Per method, the learning rate with the lowest mean final validation loss over `seeds`."""
    table: dict[str, dict[float, list[float]]] = {m: {lr: [] for lr in LR_GRID[m]} for m in methods}
    for seed in seeds:
        base = pretrain(data, hidden, seed)
        for m in methods:
            for lr in LR_GRID[m]:
                res = transfer(base, data, m, r, lr, seed, steps)
                table[m][lr].append(res.val_loss if math.isfinite(res.val_loss) else math.inf)
    means = {m: {lr: statistics.fmean(v) for lr, v in d.items()} for m, d in table.items()}
    return {m: min(d, key=d.get) for m, d in means.items()}, means


# ----------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------


def _mean_std(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.4f} ± {sd:.4f}"


def first_step_reaching(res: RunResult, acc: float) -> float:
    return next((s for s, a in zip(res.steps, res.test_acc, strict=True) if a >= acc), math.nan)


def summary_table(runs: dict[str, list[RunResult]], lrs: dict[str, float]) -> str:
    lines = [
        "| method | trainable params | lr | test acc (8/9) | test loss | mean test loss over the run "
        "| steps to 90% acc | acc on 0-7 after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, rs in runs.items():
        reach = [first_step_reaching(x, 0.9) for x in rs]
        reached = [s for s in reach if math.isfinite(s)]
        reach_txt = (
            f"{statistics.fmean(reached):.1f} ({len(reached)}/{len(rs)} seeds)" if reached else "never"
        )
        lines.append(
            f"| {m} | {rs[0].trainable} | {lrs[m]:g} | {_mean_std([x.test_acc[-1] for x in rs])} | "
            f"{_mean_std([x.test_loss[-1] for x in rs])} | {_mean_std([statistics.fmean(x.test_loss) for x in rs])} "
            f"| {reach_txt} | {_mean_std([x.old_acc for x in rs])} |"
        )
    return "\n".join(lines)


def plot_curves(runs: dict[str, list[RunResult]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for m, rs in runs.items():
        steps = np.array(rs[0].steps)
        for ax, key in zip(axes, ("test_acc", "test_loss", "train_loss"), strict=True):
            vals = np.array([getattr(x, key) for x in rs])
            mu, sd = vals.mean(0), vals.std(0)
            ax.plot(steps, mu, label=f"{m} (lr {rs[0].lr:g})")
            ax.fill_between(steps, mu - sd, mu + sd, alpha=0.2)
    for ax, name in zip(axes, ("test accuracy (8/9, 10-way)", "test loss", "train loss"), strict=True):
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = common.arg_parser(__doc__)
    p.add_argument("--r", type=int, default=4, help="budget rank: LoRA/HiRA r, ABBA r1 = r2 = r/2")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--steps", type=int, default=150, help="transfer steps (batch 32)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--sweep-seeds", type=int, nargs="+", default=[100, 101], help="seeds of the LR sweep")
    p.add_argument("--no-sweep", action="store_true", help="use the middle of each LR grid")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--quick", action="store_true", help="one seed, 20 steps, no sweep")
    a = p.parse_args(argv)
    if a.r % 2:
        p.error("--r must be even (ABBA uses r1 = r2 = r/2)")
    if a.quick:
        a.steps, a.seeds, a.no_sweep = 20, [0], True
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    data = load_data()
    print(
        f"data: pre-train {len(data.pre_train.y)} (0-7), transfer train {len(data.new_train.y)}, "
        f"val {len(data.new_val.y)}, test {len(data.new_test.y)} (8/9); old-digit test {len(data.pre_test.y)}"
    )

    if a.no_sweep:
        lrs, sweep = {m: LR_GRID[m][len(LR_GRID[m]) // 2] for m in METHODS}, {}
    else:
        lrs, sweep = sweep_lrs(data, METHODS, a.r, a.hidden, a.steps, a.sweep_seeds)
        for m, d in sweep.items():
            print(f"lr sweep {m:5s}: " + ", ".join(f"{lr:g} -> val loss {v:.4f}" for lr, v in d.items()))
    runs: dict[str, list[RunResult]] = {m: [] for m in METHODS}
    pre_accs = []
    for seed in a.seeds:
        results, pre_acc = run_seed(seed, data, METHODS, lrs, a.r, a.hidden, a.steps)
        pre_accs.append(pre_acc)
        print(f"seed {seed} pre-trained: acc on held-out 0-7 {pre_acc:.4f}")
        for m, res in results.items():
            runs[m].append(res)
            print(f"seed {seed} {m:5s}: test acc {res.test_acc[-1]:.4f}, loss {res.test_loss[-1]:.4f}")

    tag = "_quick" if a.quick else ""
    table = summary_table(runs, lrs)
    print(f"\npre-trained accuracy on held-out 0-7: {_mean_std(pre_accs)}\n" + table)
    png = a.out / f"toy_transfer{tag}.png"
    plot_curves(runs, png, f"digits 0-7 -> 8/9, r={a.r}, {len(a.seeds)} seeds (mean ± std)")
    payload = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "lrs": lrs,
        "pretrained_old_acc": pre_accs,
        "sweep_val_loss": {m: {str(lr): v for lr, v in d.items()} for m, d in sweep.items()},
        "runs": {m: [x.__dict__ for x in rs] for m, rs in runs.items()},
        "table": table,
    }
    (a.out / f"toy_transfer{tag}.json").write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {png} and {a.out / f'toy_transfer{tag}.json'}")


if __name__ == "__main__":
    main()
