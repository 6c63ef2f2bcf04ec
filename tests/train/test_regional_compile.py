"""train.compile: each decoder layer compiled after prepare(), lengths padded to a multiple of 64 and dynamic,
`auto` fixed per layer, so a run whose batches have many different lengths compiles a fixed, small number of
graphs; and the compiled run trains the adapter the eager run trains.

The backend is aot_eager (the graphs AOTAutograd builds, run op by op): no C++ compiler needed and seconds, not
minutes, on a CPU; inductor compiles the same graphs.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import cli, tiny_config, write_jsonl
from safetensors.torch import load_file

from abba_cli.data.collate import DataCollator
from abba_cli.errors import UserError
from abba_cli.train.compiling import PAD_MULTIPLE, check_engine_compiles

# Graphs a training run may build: one for the first decoder layer (its input, the frozen embedding's output,
# needs no gradient) and one shared by every other layer; lengths and paths add none.
MAX_GRAPHS = 2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_padding_to_the_multiple_stops_at_max_length():
    collate = DataCollator(pad_token_id=1, pad_to_multiple_of=PAD_MULTIPLE, max_length=100)
    rows = lambda n: [{"input_ids": [5] * n, "labels": [5] * n}]  # noqa: E731
    assert [collate(rows(n))["input_ids"].shape[1] for n in (1, 64, 65, 99, 100)] == [64, 64, 100, 100, 100]


def test_zero3_refuses_compile_and_the_other_engines_take_it():
    for strategy in ("ddp", "fsdp", "zero2"):
        check_engine_compiles(strategy)
    with pytest.raises(UserError, match="train.compile with distributed.strategy zero3"):
        check_engine_compiles("zero3")


def _rows(n: int) -> list[dict]:
    """Questions of 10 to about 130 tokens (" 7" is one token): as they come, many lengths."""
    return [
        {"question": "Tom has apples" + " 7" * (13 * i) + f" {i}?", "answer": f"#### {i}"} for i in range(n)
    ]


@pytest.mark.slow
def test_a_compiled_run_compiles_a_bounded_number_of_times_and_trains_as_eager(tmp_path, tiny_model_dir):
    rows = write_jsonl(tmp_path / "rows.jsonl", _rows(10))
    runs = {}
    for out, compiled in (("eager", False), ("compiled", True)):
        cfg = tiny_config(
            tmp_path,
            tiny_model_dir,
            out,
            data={"path": str(rows), "max_seq_len": 256},
            train={
                "compile": compiled,
                "compile_backend": "aot_eager",
                "micro_batch_size": 1,
                "max_steps": 10,
            },
        )
        result = cli("train", cfg)
        assert result.exit_code == 0, result.output
        runs[out] = result.stderr
    assert len({len(r["question"].split()) for r in _rows(10)}) == 10  # ten lengths; at most four padded
    assert "fixed for the run (train.compile)" in runs["compiled"]
    graphs = re.search(r"torch\.compile: (\d+) graph\(s\) compiled for (\d+) decoder layer", runs["compiled"])
    assert graphs, runs["compiled"][-2000:]
    assert int(graphs[2]) == 2  # the tiny model's two layers, each compiled
    assert 1 <= int(graphs[1]) <= MAX_GRAPHS
    eager = load_file(tmp_path / "eager" / "adapter_model.safetensors")
    compiled = load_file(tmp_path / "compiled" / "adapter_model.safetensors")
    assert eager.keys() == compiled.keys()  # compiled in place: the same names on disk
    # Same fp32 operations, except the compiled run's padded rows (masked out): float rounding only.
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)
