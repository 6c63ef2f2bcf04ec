"""Every bad input is caught: exit code 2, one `error:` line on stderr naming what is wrong and what is valid,
no traceback, and nothing that existed before is changed or lost.

Each case runs the real CLI (`abba_cli.cli.app` through Typer's CliRunner) against a small world in tmp_path:
a tiny Llama, a valid config and dataset, a finished ABBA run. The whole tmp tree (and the fixture models) is
hashed before and after, so an error path that writes, truncates or deletes anything fails its case.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from abba_cli.cli import app

runner = CliRunner()

# tqdm bars (model loading, tokenising) also go to stderr; they are progress, not error lines.
_PROGRESS = re.compile(r"\d+%\|.*\|")


@dataclass
class World:
    root: Path
    model: Path
    other_model: Path
    cfg: Path  # a valid run config (its output_dir does not exist yet)
    data: Path
    run: Path  # a finished ABBA run on `model`

    def config(self, name: str, **changes: object) -> Path:
        """A copy of the valid config with top-level sections replaced/merged, written to root/name."""
        raw = yaml.safe_load(self.cfg.read_text())
        for key, value in changes.items():
            if isinstance(value, dict):
                raw[key] = {**raw.get(key, {}), **value}
            else:
                raw[key] = value
        path = self.root / name
        path.write_text(yaml.safe_dump(raw))
        return path


def _rows(n: int) -> list[dict]:
    return [
        {"question": f"Natalia sold {i} clips. How many?", "answer": f"She sold {i} clips.\n#### {i}"}
        for i in range(n)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _make_run(run_dir: Path, base: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from abba_cli.adapters import inject_adapters, save_adapter
    from abba_cli.config import AdapterConfig

    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = AdapterConfig(type="abba", r1=2, r2=2, target_modules=["q_proj", "v_proj"])
    inject_adapters(model, cfg)
    save_adapter(model, cfg, run_dir, base_model=str(base))
    return run_dir


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    return _make_run(tmp_path_factory.mktemp("finished") / "run", tiny_model_dir)


@pytest.fixture
def world(tmp_path, tiny_model_dir, tiny_model_dir_other, finished_run) -> World:
    data = _write_jsonl(tmp_path / "data.jsonl", _rows(6))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
                "adapter": {"type": "abba", "r1": 2, "r2": 2, "target_modules": ["q_proj", "v_proj"]},
                "data": {"recipe": "gsm8k", "path": str(data), "max_seq_len": 128},
                "train": {"max_steps": 2},
                "output_dir": str(tmp_path / "out-run"),
            }
        )
    )
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return World(tmp_path, tiny_model_dir, tiny_model_dir_other, cfg, data, run)


def _tree(*roots: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _error_lines(stderr: str) -> list[str]:
    lines = [line for chunk in stderr.splitlines() for line in chunk.split("\r")]
    return [line for line in lines if line.strip() and not _PROGRESS.search(line)]


# ----------------------------------------------------------------------------------------------- the cases
# Each case: (id, builder(world) -> CLI args, substrings the error line must contain (what is wrong + what is
# valid)). Builders may prepare extra files; they run before the tree snapshot.


def _cfg_file(text: str) -> Callable[[World], list[str]]:
    def build(w: World) -> list[str]:
        p = w.root / "bad.yaml"
        p.write_text(text.replace("MODEL", str(w.model)))
        return ["train", str(p)]

    return build


def _train_set(*sets: str, cmd: str = "train") -> Callable[[World], list[str]]:
    def build(w: World) -> list[str]:
        args = [cmd, str(w.cfg)]
        for s in sets:
            args += [s] if s.startswith("--") else ["--set", s.replace("ROOT", str(w.root))]
        return args

    return build


def _train_with_data(rows: list[dict] | str) -> Callable[[World], list[str]]:
    def build(w: World) -> list[str]:
        path = w.root / "bad-data.jsonl"
        if isinstance(rows, str):
            path.write_text(rows)
        else:
            _write_jsonl(path, rows)
        return ["train", str(w.cfg), "--set", f"data.path={path}"]

    return build


def _existing_output(w: World) -> list[str]:
    out = w.root / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    return ["train", str(w.cfg), "--set", f"output_dir={out}"]


def _resume_changed(w: World) -> list[str]:
    from abba_cli.config import dump_config, load_config

    out = w.root / "started"
    out.mkdir()
    (out / "config.yaml").write_text(dump_config(load_config(w.cfg, [f"output_dir={out}"])))
    return ["train", str(w.cfg), "--set", f"output_dir={out}", "--set", "train.lr=0.5", "--resume"]


def _run_without(name: str, cmd: list[str]) -> Callable[[World], list[str]]:
    def build(w: World) -> list[str]:
        (w.run / name).unlink()
        return [*cmd, "--run", str(w.run)] + (["--out", str(w.root / "o")] if cmd[0] != "eval" else [])

    return build


def _corrupt_weights(how: str, cmd: list[str]) -> Callable[[World], list[str]]:
    def build(w: World) -> list[str]:
        weights = w.run / "adapter_model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00garbage" * 20)
        extra = ["--out", str(w.root / "o")] if cmd[0] != "eval" else ["--model", str(w.model)]
        return [*cmd, "--run", str(w.run), *extra]

    return build


def _other_base(cmd: str) -> Callable[[World], list[str]]:
    def build(w: World) -> list[str]:
        if cmd == "eval":
            return ["eval", "--task", "gsm8k", "--run", str(w.run), "--model", str(w.other_model)]
        # The run records another base model than the one its tensors were trained on.
        conf = json.loads((w.run / "adapter_config.json").read_text())
        conf["base_model"] = str(w.other_model)
        (w.run / "adapter_config.json").write_text(json.dumps(conf))
        return [cmd, "--run", str(w.run), "--out", str(w.root / "o")] + (
            ["--format", "peft-lora"] * (cmd == "export")
        )

    return build


def _out_is_under_a_file(cmd: list[str]) -> Callable[[World], list[str]]:
    # Tests run as root, where permission bits do not stop writes; a path below a regular file is unwritable
    # for everyone.
    def build(w: World) -> list[str]:
        blocker = w.root / "blocker.txt"
        blocker.write_text("a file, not a directory")
        return [*cmd, "--run", str(w.run), "--out", str(blocker / "out")]

    return build


def _out_not_empty(cmd: list[str]) -> Callable[[World], list[str]]:
    def build(w: World) -> list[str]:
        out = w.root / "existing-out"
        out.mkdir()
        (out / "keep.txt").write_text("precious")
        return [*cmd, "--run", str(w.run), "--out", str(out)]

    return build


CASES: list[tuple[str, Callable[[World], list[str]], list[str]]] = [
    # --- config file and --set (train / validate)
    ("yaml-syntax", _cfg_file("model: {name_or_path: MODEL\ndata: [\n"), ["YAML syntax error", "line"]),
    ("config-not-mapping", _cfg_file("- model\n- data\n"), ["expected a mapping", "model, adapter"]),
    ("config-missing", lambda w: ["train", str(w.root / "nope.yaml")], ["nope.yaml", "not found"]),
    ("unknown-key", _train_set("adapter.rank=8"), ["adapter.rank", "unknown key", "r1"]),
    ("unknown-section", _train_set("optimizer.lr=1"), ["optimizer", "unknown key", "train"]),
    ("wrong-type", _train_set("train.lr=fast"), ["train.lr", "'fast'", "number"]),
    (
        "negative-batch",
        _train_set("train.micro_batch_size=-1"),
        ["train.micro_batch_size", "greater than or equal to 1", "-1"],
    ),
    (
        "zero-accum",
        _train_set("train.grad_accum_steps=0"),
        ["train.grad_accum_steps", "greater than or equal to 1"],
    ),
    ("zero-lr", _train_set("train.lr=0"), ["train.lr", "greater than 0"]),
    ("r1-zero", _train_set("adapter.r1=0"), ["adapter.r1", "greater than or equal to 1"]),
    ("r-for-abba", _train_set("adapter.r=8"), ["adapter.r", "adapter.r1"]),
    ("bad-model-dtype", _train_set("model.dtype=fp8"), ["model.dtype", "'fp8'", "bfloat16"]),
    ("bad-scheduler", _train_set("train.scheduler=step"), ["train.scheduler", "cosine"]),
    ("set-without-equals", _train_set("train.lr"), ["--set", "KEY=VALUE"]),
    ("set-into-scalar", _train_set("output_dir.x=1"), ["output_dir", "not a section"]),
    ("rank-too-large", _train_set("adapter.r1=100", cmd="validate"), ["adapter.r1=100", "<= 64"]),
    ("targets-match-nothing", _train_set("adapter.target_modules=[qq_proj]"), ["qq_proj", "q_proj"]),
    ("target-not-linear", _train_set("adapter.target_modules=[mlp]"), ["mlp", "nn.Linear"]),
    (
        "missing-model",
        _train_set("model.name_or_path=ROOT/no-model"),
        ["no-model", "no such model directory"],
    ),
    ("unknown-recipe", _train_set("data.recipe=gsm9k"), ["gsm9k", "gsm8k"]),
    ("missing-dataset", _train_set("data.path=ROOT/none.jsonl"), ["none.jsonl", "no such file"]),
    ("empty-dataset", _train_with_data(""), ["bad-data.jsonl", "no rows"]),
    (
        "wrong-field-names",
        _train_with_data([{"q": "1+1?", "a": "2"}] * 3),
        ["'answer'", "fields present: a, q"],
    ),
    ("prompt-longer-than-max-seq-len", _train_set("data.max_seq_len=16"), ["data.max_seq_len", "raise"]),
    ("existing-run-dir", _existing_output, ["already exists", "--resume"]),
    ("resume-nothing", _train_set("output_dir=ROOT/fresh", "--resume"), ["no run to resume"]),
    ("resume-changed-config", _resume_changed, ["differs", "train.lr"]),
    # --- eval
    ("eval-unknown-task", lambda w: ["eval", "--task", "gsm9k", "--run", str(w.run)], ["gsm9k", "gsm8k"]),
    ("eval-no-task", lambda w: ["eval", "--model", str(w.model)], ["--task", "gsm8k"]),
    (
        "eval-missing-run",
        lambda w: ["eval", "-t", "gsm8k", "--run", str(w.root / "nope")],
        ["nope", "no such run"],
    ),
    ("eval-no-latest-run", lambda w: ["eval", "-t", "gsm8k"], ["no finished run", "--run"]),
    (
        "eval-missing-adapter-config",
        _run_without("adapter_config.json", ["eval", "-t", "gsm8k"]),
        ["adapter_config.json"],
    ),
    (
        "eval-truncated-weights",
        _corrupt_weights("truncated", ["eval", "-t", "gsm8k"]),
        ["corrupt", "safetensors"],
    ),
    ("eval-other-base", _other_base("eval"), ["another base"]),
    # --- merge
    (
        "merge-bad-dtype",
        lambda w: ["merge", "--out", str(w.root / "m"), "--run", str(w.run), "--dtype", "fp8"],
        ["'fp8'", "bf16"],
    ),
    ("merge-out-not-empty", _out_not_empty(["merge"]), ["not empty", "--overwrite"]),
    ("merge-out-unwritable", _out_is_under_a_file(["merge"]), ["blocker.txt", "not a directory"]),
    ("merge-corrupt-weights", _corrupt_weights("garbage", ["merge"]), ["corrupt", "safetensors"]),
    (
        "merge-missing-weights",
        _run_without("adapter_model.safetensors", ["merge"]),
        ["adapter_model.safetensors"],
    ),
    ("merge-other-base", _other_base("merge"), ["another base"]),
    # --- export
    (
        "export-unknown-format",
        lambda w: ["export", "--format", "gguf", "--out", str(w.root / "x"), "--run", str(w.run)],
        ["'gguf'", "peft-lora"],
    ),
    ("export-out-not-empty", _out_not_empty(["export"]), ["not empty", "--overwrite"]),
    ("export-out-unwritable", _out_is_under_a_file(["export"]), ["blocker.txt", "not a directory"]),
    ("export-truncated-weights", _corrupt_weights("truncated", ["export"]), ["corrupt", "safetensors"]),
    (
        "export-missing-adapter-config",
        _run_without("adapter_config.json", ["export"]),
        ["adapter_config.json"],
    ),
    ("export-other-base", _other_base("export"), ["another base"]),
    # --- errors the option parser catches before any command runs
    (
        "eval-limit-zero",
        lambda w: ["eval", "--task", "gsm8k", "--limit", "0"],
        ["--limit", "greater than or equal to 1"],
    ),
    ("train-no-config", lambda w: ["train"], ["train: Missing argument 'config'"]),
    ("unknown-command", lambda w: ["trian"], ["No such command 'trian'"]),
]


@pytest.mark.parametrize("build,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world: World, build, expected: list[str]) -> None:
    args = build(world)
    before = _tree(world.root, world.model, world.other_model)

    result = runner.invoke(app, args)

    errors = _error_lines(result.stderr)
    assert result.exit_code == 2, (result.exit_code, result.output, repr(result.exception))
    assert len(errors) == 1, errors
    line = errors[0]
    assert line.startswith("error: "), line
    for text in expected:
        assert text in line, (text, line)
    assert "Traceback" not in result.output
    assert _tree(world.root, world.model, world.other_model) == before


def test_cases_cover_every_command() -> None:
    # The brief: at least 25 cases across train, validate, eval, merge and export.
    assert len(CASES) >= 25
    assert {c[0].split("-")[0] for c in CASES} >= {"eval", "merge", "export"}


def test_debug_shows_the_traceback(world: World) -> None:
    """The same bad input with --debug: the full traceback on stderr, in a real process."""
    import os
    import subprocess
    import sys

    args = ["--debug", "train", str(world.cfg), "--set", "train.lr=fast"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "abba_cli", *args], capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "UserError" in proc.stderr and "train.lr" in proc.stderr
