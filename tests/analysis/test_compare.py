"""`abba compare`: budget matching (counts by hand), --set parsing, the refusals, and a real 2 methods x 2 seeds
comparison on the tiny model: outputs, table cells recomputed from the run files, resume after an interruption."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest
import yaml
from helpers import subprocess_env
from safetensors.torch import load_file
from typer.testing import CliRunner

from abba_cli.analysis.compare import grid as runner
from abba_cli.analysis.compare.budget import method_block, parse_methods, plan_methods, split_sets
from abba_cli.analysis.compare.table import wilson
from abba_cli.cli import app
from abba_cli.config import validate_config
from abba_cli.errors import UserError
from abba_cli.train import state as train_state

# q_proj is 64 x 64 and v_proj 32 x 64 in the tiny Llama: m + n = 128 + 96 = 224 per block, 2 blocks.
SUM_M_N = 2 * (128 + 96)


def _raw(model_dir: Path, out: Path, adapter: dict | None = None, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "adapter": adapter or {"type": "abba", "r1": 2, "r2": 3, "target_modules": ["q_proj", "v_proj"]},
        "data": {
            "recipe": "gsm8k_bundled_train",
            "skip_samples": 50,
            "num_samples": 8,
            "val_samples": 4,
            "max_seq_len": 512,
        },
        "train": {
            "max_steps": 4,
            "micro_batch_size": 2,
            "lr": 1e-2,
            "warmup_ratio": 0.0,
            "eval_every": 2,
            **train,
        },
        "eval": {"tasks": ["boolq"], "limit": 2, "max_new_tokens": 2, "batch_size": 2},
        "output_dir": str(out / "unused"),
    }


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_budget_counts_match_by_hand(tmp_path, tiny_model_dir):
    raw = _raw(tiny_model_dir, tmp_path)
    plans = plan_methods(raw, "cmp.yaml", ["abba", "lora", "hira", "rslora", "pissa", "full"], {})
    counts = {p.method: p.trainable for p in plans}
    # ABBA (r1 + r2)(m + n) = 5 x 448; LoRA / HiRA r (m + n) with r = 5; rsLoRA and PiSSA are LoRA r = 5
    assert counts == {
        "abba": 5 * SUM_M_N,
        "lora": 5 * SUM_M_N,
        "hira": 5 * SUM_M_N,
        "rslora": 5 * SUM_M_N,
        "pissa": 5 * SUM_M_N,
        "full": sum(v.numel() for v in load_file(tiny_model_dir / "model.safetensors").values()),
    }
    by = {p.method: p.cfg.adapter for p in plans}
    assert (by["abba"].r1, by["abba"].r2, by["abba"].alpha) == (2, 3, 16.0)  # the config's own block, kept
    assert (by["lora"].r, by["lora"].alpha, by["hira"].r, by["hira"].alpha) == (5, 10.0, 5, 5.0)  # defaults
    assert by["rslora"].use_rslora and by["pissa"].init == "pissa" and by["full"].type == "full"
    assert "not matched" in next(p.describe for p in plans if p.method == "full")


def test_abba_from_a_lora_budget_splits_the_rank(tmp_path, tiny_model_dir):
    cfg = validate_config(_raw(tiny_model_dir, tmp_path, {"type": "lora", "r": 7, "alpha": 3.0}))
    assert method_block("abba", cfg)["r1"] == 4 and method_block("abba", cfg)["r2"] == 3
    assert method_block("lora", cfg)["alpha"] == 3.0  # the config's own method keeps its alpha
    assert "alpha" not in method_block("rslora", cfg) and "alpha" not in method_block("hira", cfg)
    one = validate_config(_raw(tiny_model_dir, tmp_path, {"type": "lora", "r": 1}))
    with pytest.raises(UserError, match="abba cannot match the budget of lora r=1"):
        method_block("abba", one)


def test_a_rank_a_layer_cannot_hold_is_refused(tmp_path, tiny_model_dir):
    # ABBA 20 + 20 fits v_proj (rank <= 32), but LoRA at r = 40 does not
    raw = _raw(tiny_model_dir, tmp_path, {"type": "abba", "r1": 20, "r2": 20, "target_modules": ["v_proj"]})
    with pytest.raises(UserError, match=r"lora cannot match the budget .*adapter.r=40"):
        plan_methods(raw, "cmp.yaml", ["abba", "lora"], {})


def test_per_method_sets(tmp_path, tiny_model_dir):
    common, per = split_sets(
        ["train.lr=1e-3", "lora:train.lr=3e-4", "abba:adapter.alpha=8"], ["abba", "lora"]
    )
    assert common == ["train.lr=1e-3"] and per == {"abba": ["adapter.alpha=8"], "lora": ["train.lr=3e-4"]}
    with pytest.raises(UserError, match="'hira' is not one of the compared methods"):
        split_sets(["hira:train.lr=1"], ["abba", "lora"])
    with pytest.raises(UserError, match="unknown method loha"):
        parse_methods("abba,loha")
    raw = _raw(tiny_model_dir, tmp_path)
    plans = plan_methods(raw, "cmp.yaml", ["abba", "lora"], per)
    assert plans[0].cfg.adapter.alpha == 8.0 and plans[0].cfg.train.lr == 1e-2
    assert plans[1].cfg.train.lr == 3e-4 and plans[1].cfg.adapter.alpha == 10.0
    with pytest.raises(UserError, match="the budget is 2,240"):  # a per-method rank change breaks the match
        plan_methods(copy.deepcopy(raw), "cmp.yaml", ["abba", "lora"], {"lora": ["adapter.r=6"]})


def _cli(*args: str):
    return CliRunner().invoke(app, ["compare", *args])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data": {"val_samples": None}}, "needs validation data"),
        ({"eval": {"tasks": []}}, "needs eval.tasks"),
        (
            {"adapter": {"type": "full", "r1": None, "r2": None, "target_modules": ["q_proj"]}},
            "must describe an adapter",
        ),
    ],
)
def test_refusals_are_one_line(tmp_path, tiny_model_dir, change, message):
    raw = _raw(tiny_model_dir, tmp_path)
    for section, values in change.items():
        raw[section].update(values)
    result = _cli(str(_write(tmp_path, raw)), "--methods", "abba,lora", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unknown_method_on_the_command_line(tmp_path, tiny_model_dir):
    result = _cli(
        str(_write(tmp_path, _raw(tiny_model_dir, tmp_path))),
        "--methods",
        "abba,qlora",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.exit_code == 2 and "unknown method qlora; valid: abba, lora, hira" in result.output


def _adapters(out: Path) -> dict[str, dict]:
    return {p.name: load_file(p / "adapter_model.safetensors") for p in sorted((out / "runs").iterdir())}


def test_two_methods_two_seeds_table_and_resume(tmp_path, tiny_model_dir, monkeypatch):
    cfg = _write(tmp_path, _raw(tiny_model_dir, tmp_path, save_every=2, save_total_limit=3))
    args = [str(cfg), "--methods", "abba,lora", "--seeds", "2", "--set", "lora:train.lr=3e-3"]
    whole = tmp_path / "whole"
    result = _cli(*args, "--out", str(whole))
    assert result.exit_code == 0, result.output
    assert "abba" in result.output and f"{5 * SUM_M_N:,}" in result.output  # the budget, printed
    names = ["abba_seed1", "abba_seed2", "lora_seed1", "lora_seed2"]
    assert sorted(p.name for p in (whole / "runs").iterdir()) == names
    saved = yaml.safe_load((whole / "runs" / "lora_seed2" / "config.yaml").read_text())
    assert (saved["train"]["seed"], saved["data"]["seed"], saved["train"]["lr"]) == (2, 2, 3e-3)
    assert (saved["adapter"]["type"], saved["adapter"]["r"]) == ("lora", 5)

    # Every cell recomputed from the run files.
    table = json.loads((whole / "compare.json").read_text())
    for method in ("abba", "lora"):
        runs = [whole / "runs" / f"{method}_seed{s}" for s in (1, 2)]
        vals = [
            [
                json.loads(x)["val_loss"]
                for x in (r / "metrics.jsonl").read_text().splitlines()
                if "val_loss" in x
            ]
            for r in runs
        ]
        assert all(len(v) == 2 for v in vals)  # steps 2 and 4
        m = table["methods"][method]
        assert m["final_val_loss"]["mean"] == pytest.approx(statistics.mean(v[-1] for v in vals))
        assert m["final_val_loss"]["sd"] == pytest.approx(statistics.stdev(v[-1] for v in vals))
        assert m["best_val_loss"]["mean"] == pytest.approx(statistics.mean(min(v) for v in vals))
        evals = [json.loads((r / "eval" / "boolq" / "metrics.json").read_text()) for r in runs]
        c, n = sum(e["correct"] for e in evals), sum(e["n"] for e in evals)
        pooled = m["accuracy"]["pooled"]
        assert (pooled["correct"], pooled["n"]) == (c, n) and n == 4
        assert pooled["ci95"] == pytest.approx(list(wilson(c, n)))
        last = [json.loads((r / "metrics.jsonl").read_text().splitlines()[-1]) for r in runs]
        assert m["seconds_per_step"]["mean"] == pytest.approx(
            statistics.mean(x["elapsed_s"] / 4 for x in last)
        )
        assert m["peak_memory_bytes"] > 0 and m["memory_kind"] == "peak_rss"
    md = (whole / "compare.md").read_text()
    assert md.splitlines()[4].startswith("| abba | abba r1=2 r2=3") and "| boolq | 2 |" in md
    assert (whole / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Interrupted inside the second run, just after its step-2 checkpoint: the rerun keeps the finished run,
    # resumes the interrupted one from its checkpoint, trains the rest; every adapter ends as in `whole`.
    real = train_state.write_checkpoint

    def dying(run):
        path = real(run)
        if run.run_dir.name == "lora_seed1":
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_state, "write_checkpoint", dying)
    split = tmp_path / "split"
    assert _cli(*args, "--out", str(split)).exit_code == 130
    assert (split / "runs" / "abba_seed1" / "adapter_model.safetensors").is_file()
    assert not (split / "runs" / "lora_seed1" / "adapter_model.safetensors").exists()
    # (not monkeypatch.undo(): that would also undo conftest's ABBA_HOME and offline settings)
    monkeypatch.setattr(train_state, "write_checkpoint", real)
    calls = []
    real_train = runner._train
    monkeypatch.setattr(
        runner,
        "_train",
        lambda c, p, resume: calls.append((Path(c.output_dir).name, resume)) or real_train(c, p, resume),
    )
    result = _cli(*args, "--out", str(split))
    assert result.exit_code == 0, result.output
    assert "kept (finished)" in result.stderr and "resuming from" in result.stderr
    assert calls == [("lora_seed1", True), ("abba_seed2", False), ("lora_seed2", False)]
    a, b = _adapters(whole), _adapters(split)
    assert a.keys() == b.keys()
    for name in a:
        assert all(a[name][k].equal(b[name][k]) for k in a[name]), name

    # A third run of the same command trains nothing; a changed setting is refused, not silently mixed in.
    calls.clear()
    assert _cli(*args, "--out", str(split)).exit_code == 0 and calls == []
    result = _cli(*args, "--set", "lora:train.lr=5e-2", "--out", str(split))
    assert result.exit_code == 2 and "lora_seed1 was trained with other settings (train.lr)" in result.output
    assert calls == []  # refused before any run trained


def test_wilson_interval_known_value():
    lo, hi = wilson(7, 10)  # the textbook example: 0.3968 to 0.8922
    assert lo == pytest.approx(0.39677, abs=1e-4) and hi == pytest.approx(0.89222, abs=1e-4)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0


@pytest.mark.slow
def test_under_torchrun_every_run_uses_both_processes(tmp_path, tiny_model_dir):
    """2 CPU processes (gloo; see train/test_distributed_strategies.py for why torchrun): every run is one distributed run,
    runs go one after another, and the budget, evaluation and table come once, from the main process."""
    import subprocess
    import sys

    cfg = _write(tmp_path, _raw(tiny_model_dir, tmp_path, max_steps=2, micro_batch_size=1))
    env = subprocess_env(tmp_path, ACCELERATE_USE_CPU="true")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = tmp_path / "cmp"
    p = subprocess.run(
        [
            *launch,
            "-m",
            "abba_cli",
            "compare",
            str(cfg),
            "--methods",
            "abba,lora",
            "--seeds",
            "1",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    assert log.count("x 2 process(es)") == 2  # two runs, each distributed over both processes
    assert log.count("budget:") == 1 and log.count("written: ") == 1
    for name in ("abba_seed1", "lora_seed1"):
        steps = [
            json.loads(x)["step"] for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()
        ]
        assert steps == [1, 2]  # one line per step: only the main process writes
        assert (out / "runs" / name / "eval" / "boolq" / "metrics.json").is_file()
    assert json.loads((out / "compare.json").read_text())["methods"]["lora"]["runs"] == ["lora_seed1"]
