"""benchmarks/quant_bench.py --estimate: the architectures it computes from are the published models."""

from __future__ import annotations

import pytest

from benchmarks import quant_bench as bench


@pytest.mark.parametrize(
    ("prefix", "billions"),
    # The parameter counts their model cards publish: a typo in a hidden size or layer count shows here.
    [("Llama-3.2-1B", 1.24), ("Llama-3.2-3B", 3.21), ("Mistral-7B", 7.24), ("Gemma-2-9B", 9.24)],
)
def test_paper_architectures_have_their_published_sizes(prefix, billions):
    (arch,) = [a for name, a in bench.PAPER.items() if name.startswith(prefix)]
    assert round(bench.estimate(arch)["params_B"], 2) == billions


def test_4bit_bytes_per_weight():
    assert bench.NF4_BYTES == 4.5 / 8  # 4 bits + an fp32 absmax per 64 weights
    assert bench.NF4_DQ_BYTES == pytest.approx((4 + 0.125 + 32 / 16384) / 8)


def test_checkpointing_keeps_only_layer_inputs_plus_one_layer():
    arch = bench.PAPER["Mistral-7B (configs/mistral_metamath.yaml)"]
    with_ckpt = bench.estimate(arch)["activations"]
    without = bench.estimate((*arch[:-1], False))["activations"]
    assert without > 5 * with_ckpt
