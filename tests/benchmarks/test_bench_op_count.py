"""Kernel launches per training micro-batch (benchmarks/op_count.py), counted, not timed: every ABBA path stays
within 1.25x our LoRA's, and the launch table `auto`'s cost model prices is what the code runs."""

from __future__ import annotations

import pytest
import torch

from abba_cli.adapters import cost
from benchmarks import layer_sweep as sweep
from benchmarks import op_count


def test_every_abba_path_launches_at_most_1_25x_our_loras_ops():
    """The benchmark's setting (2-layer Llama, bf16 autocast, fp32 factors, all seven projections, ABBA
    r1 = r2 = 16 against LoRA r = 32) at width 64 and 128 tokens: the counts do not depend on the sizes, only
    `auto`'s choice does, and every forced path is held to the bound as well."""
    variants = [v for v in op_count.VARIANTS if v != "peft_lora"]
    res = op_count.count_all(width=64, layers=2, batch=1, seq=128, variants=variants)
    rows = res["rows"]
    lora = rows["lora"]["total"]
    assert rows["none"]["total"] < lora
    for variant in ("abba_auto", "abba_khatri_rao", "abba_merged", "abba_hybrid"):
        assert rows[variant]["total"] <= 1.25 * lora, (variant, rows[variant]["total"], lora)
        # the factors are cast once per adapted layer call (the pack), not per use, and not in backward
        casts = rows[variant]["ops"].get("aten._to_copy", 0) - rows["none"]["ops"].get("aten._to_copy", 0)
        assert casts <= len(op_count.TARGETS) * 2, (variant, casts)
    table = op_count.to_markdown(res)
    assert table.count("\n") == len(rows) + 1 and "| lora |" in table


def test_the_counter_skips_views_and_counts_kernels():
    x = torch.randn(4, 6)
    with op_count.OpCounter() as counter:
        y = x.view(6, 4).t().unsqueeze(0)  # views only
        z = (x @ x.T).add_(1.0)  # two kernels
        x.to(torch.bfloat16)  # a cast is a kernel
    assert y.numel() == 24 and z.shape == (4, 4)
    assert dict(counter.counts) == {"aten.mm": 1, "aten.add_": 1, "aten._to_copy": 1}


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize(("r1", "r2"), [(4, 4), (3, 5)])
def test_cost_models_launch_table_is_what_the_code_runs(dropout, r1, r2):
    """cost.LAUNCHES against the layer sweep's own runners (what a sweep records per cell and a fit prices)."""
    w, x, dy, _, lora_f = sweep._cell_inputs(40, 24, 8, 16, "cpu", torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    shapes = [(40, r1), (r1, 24), (40, r2), (r2, 24)]
    abba_f = [torch.randn(s, generator=gen).requires_grad_(True) for s in shapes]
    counted = {}
    for path, fn in sweep._runners(w, x, dy, abba_f, lora_f, s=0.5, dropout=dropout).items():
        fn()  # warm-up
        with op_count.OpCounter() as counter:
            fn()
        counted[path] = counter.total
    del counted["lora"]
    assert counted == cost.path_launches(r1, r2, dropout)
