"""benchmarks/e2e_step.py: real `abba train` subprocesses, interleaved, reduced to per-step times and ratios.

Structure only (no timing assertions): a tiny Llama stands in for SmolLM2.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import common, e2e_step


def test_step_times_leave_out_the_first_steps(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {"step": k, "elapsed_s": e, "tokens": 10 * k, "loss": 1.0}
        for k, e in [(1, 9.0), (2, 10.0), (3, 12.0), (4, 15.0)]
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = e2e_step.step_times(metrics, skip=2)
    assert got["steps_s"] == [2.0, 3.0]  # step 1's 9 s (loading, first allocations) is not in
    assert got["step_s"] == 2.5
    assert got["tokens"] == 40


def test_round_robin_rotates_the_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name) or len(calls)) for name in "ABC"}
    out = common.round_robin(fns, 3)
    assert calls == list("ABCBCACAB")
    assert out == {"A": [1, 6, 8], "B": [2, 4, 9], "C": [3, 5, 7]}


def test_timed_runs_do_not_inherit_the_memory_benchmarks_allocator_settings(monkeypatch, tmp_path):
    """`make bench` exports MALLOC_*_THRESHOLD_ for its peak-memory tables; a timed `abba train` under them
    page-faults every tensor in again each step, which no user sees."""
    for key, value in common.MEASURE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    env = e2e_step.run_env(tmp_path, threads=0)
    assert not set(common.MEASURE_ENV) & set(env)
    assert env["OMP_NUM_THREADS"] == "7" and env["ABBA_HOME"] == str(tmp_path / "home")
    assert e2e_step.run_env(tmp_path, threads=1)["OMP_NUM_THREADS"] == "1"


@pytest.mark.slow  # two `abba train` subprocesses
def test_measure_runs_real_abba_train_and_reports_ratios(tiny_model_dir):
    # The tiny byte-level tokenizer spends ~3x SmolLM2's tokens on a GSM8K problem: a longer max_seq_len, and the
    # extra --set lands after the pinned setting (it wins).
    res = e2e_step.measure(
        rounds=1, dropouts=[0.0], steps=3, skip=1, model=str(tiny_model_dir), extra=["data.max_seq_len=1024"]
    )
    (row,) = res["rows"]
    assert row["dropout"] == 0.0
    for method in ("abba", "lora"):
        (run,) = res["runs"][f"{method}@0"]
        assert len(run["steps_s"]) == 2  # steps 2 and 3 of 3
        # one round: its median is that run's mean time over the kept steps
        assert row[method]["n"] == 1
        assert row[method]["median"] == pytest.approx(sum(run["steps_s"]) / 2, rel=1e-6, abs=1e-9)
        assert len(run["loss"]) == 3
    assert row["ratio"]["per_round"] == [row["abba"]["median"] / row["lora"]["median"]]
    assert row["plan"].startswith("ABBA execution at 4096 tokens per micro-batch")
    assert "adapter.r=32" in res["config"]["overrides"]["lora"]
    table = e2e_step.to_markdown(res)
    assert "ABBA / LoRA" in table and "steps 2-3 of 3" in table
