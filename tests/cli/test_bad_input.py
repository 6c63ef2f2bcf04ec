"""Every bad input is caught: exit code 2, one `error:` line on stderr naming what is wrong and what is valid,
no traceback, and nothing that existed before is changed or lost.

Each case runs the real CLI (`abba_cli.cli.app` through Typer's CliRunner) against a small world in tmp_path:
a tiny Llama, a valid config and dataset, a finished ABBA run. The whole tmp tree (and the fixture models) is
hashed before and after, so an error path that writes, truncates or deletes anything fails its case.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import cli

from abba_cli.cli import app

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


def _make_world(root: Path, model: Path, other_model: Path, finished_run: Path) -> World:
    root.mkdir(parents=True, exist_ok=True)
    data = _write_jsonl(root / "data.jsonl", _rows(6))
    cfg = root / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(model), "dtype": "float32"},
                "adapter": {"type": "abba", "r1": 2, "r2": 2, "target_modules": ["q_proj", "v_proj"]},
                "data": {"recipe": "gsm8k", "path": str(data), "max_seq_len": 128},
                "train": {"max_steps": 2},
                "output_dir": str(root / "out-run"),
            }
        )
    )
    run = root / "run"
    shutil.copytree(finished_run, run)
    return World(root, model, other_model, cfg, data, run)


@pytest.fixture
def world(tmp_path, tiny_model_dir, tiny_model_dir_other, finished_run) -> World:
    return _make_world(tmp_path, tiny_model_dir, tiny_model_dir_other, finished_run)


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


def _inspect_corrupt(w: World) -> list[str]:
    (w.run / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 20)
    return ["inspect", str(w.run), "--out", str(w.root / "o")]


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


def _cfg_bytes(data: bytes, cmd: str = "train") -> Callable[[World], list[str]]:
    def build(w: World) -> list[str]:
        p = w.root / "bad.yaml"
        p.write_bytes(data.replace(b"MODEL", str(w.model).encode()))
        return [cmd, str(p)]

    return build


def _dir_as_config(with_saved_config: bool) -> Callable[[World], list[str]]:
    def build(w: World) -> list[str]:
        d = w.root / "a-run"
        d.mkdir()
        if with_saved_config:
            shutil.copy(w.cfg, d / "config.yaml")
        return ["train", str(d)]

    return build


def _broken_base(
    name: str, content: Callable[[bytes], bytes], cmd: str = "train"
) -> Callable[[World], list[str]]:
    """A copy of the tiny base model with one file rewritten (content(old bytes) -> new bytes)."""

    def build(w: World) -> list[str]:
        base = w.root / "broken-base"
        shutil.copytree(w.model, base)
        (base / name).write_bytes(content((base / name).read_bytes()))
        return [cmd, str(w.cfg), "--set", f"model.name_or_path={base}"]

    return build


def _recipe_bytes(data: bytes) -> Callable[[World], list[str]]:
    def build(w: World) -> list[str]:
        recipe = w.root / "my-recipe.yaml"
        recipe.write_bytes(data)
        return ["train", str(w.cfg), "--set", f"data.recipe={recipe}"]

    return build


def _latest_run_bytes(cmd: list[str]) -> Callable[[World], list[str]]:
    def build(w: World) -> list[str]:
        marker = Path(os.environ["ABBA_HOME"]) / "latest_run"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_bytes(str(w.run).encode() + b"\xff\n")
        return [*cmd, *(["--out", str(w.root / "o")] if cmd[0] != "eval" else [])]

    return build


def _flash_attn_2_usable() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


_NEEDS_NO_FLASH = pytest.mark.skipif(_flash_attn_2_usable(), reason="flash-attn is usable on this machine")

CASES: list[tuple[str, Callable[[World], list[str]], list[str]]] = [
    # --- config file and --set (train / validate)
    (
        "yaml-syntax",
        _cfg_file("model: {name_or_path: MODEL\ndata: [\n"),
        ["bad.yaml: YAML syntax error (line 2, column 5)"],
    ),
    ("config-not-mapping", _cfg_file("- model\n- data\n"), ["expected a mapping", "model, adapter"]),
    ("config-missing", lambda w: ["train", str(w.root / "nope.yaml")], ["nope.yaml", "not found"]),
    (
        "config-not-utf8",
        _cfg_bytes(b"model: {name_or_path: MODEL}\n# caf\xe9\n"),
        ["bad.yaml: line 2: byte 0xe9 is not UTF-8", "save the file as UTF-8"],
    ),
    (
        "config-duplicate-key",
        _cfg_bytes(b"model: {name_or_path: MODEL}\ntrain:\n  lr: 0.1\n  lr: 0.2\n", cmd="validate"),
        ["bad.yaml: line 4: key 'lr' is given twice (first on line 3)"],
    ),
    ("config-is-a-directory", _dir_as_config(False), ["a-run is a directory, not a config file", "configs/"]),
    ("run-dir-as-config", _dir_as_config(True), ["a-run is a directory", "a-run/config.yaml", "--resume"]),
    ("nan-lr", _train_set("train.lr=nan"), ["train.lr: must be a finite number (got 'nan')"]),
    ("inf-alpha", _train_set("adapter.alpha=.inf"), ["adapter.alpha: must be a finite number (got inf)"]),
    (
        "bogus-attention",
        _train_set("model.attn_implementation=bogus"),
        ["model.attn_implementation: Input should be 'eager', 'sdpa'", "(got 'bogus')"],
    ),
    pytest.param(
        "flash-attention-not-installed",
        _train_set("model.attn_implementation=flash_attention_2"),
        ["model.attn_implementation 'flash_attention_2' cannot run here", "flash-attn", "sdpa"],
        marks=_NEEDS_NO_FLASH,
    ),
    (
        "base-truncated-weights",
        _broken_base("model.safetensors", lambda b: b[: len(b) // 2]),
        ["broken-base/model.safetensors is truncated or corrupt"],
    ),
    (
        "base-config-not-json",
        _broken_base("config.json", lambda b: b + b"}"),
        ["broken-base/config.json is not valid JSON (line"],
    ),
    (
        "base-config-not-utf8",
        _broken_base("config.json", lambda b: b.replace(b'"llama"', b'"ll\xe9ma"'), cmd="validate"),
        ["broken-base/config.json: line", "byte 0xe9 is not UTF-8"],
    ),
    (
        "recipe-not-utf8",
        _recipe_bytes(b"name: my-recipe\ndescription: caf\xe9\n"),
        ["my-recipe.yaml: line 2: byte 0xe9 is not UTF-8"],
    ),
    (
        "recipe-duplicate-key",
        _recipe_bytes(b"name: my-recipe\nkind: train\nname: other\n"),
        ["my-recipe.yaml: line 3: key 'name' is given twice (first on line 1)"],
    ),
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
    (
        "eval-latest-run-not-utf8",
        _latest_run_bytes(["eval", "-t", "gsm8k"]),
        ["latest_run: the latest-run record is empty or not UTF-8 text", "--run RUN_DIR"],
    ),
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
    (
        "merge-onto-dequantized-without-quantization",
        lambda w: ["merge", "--out", str(w.root / "m"), "--run", str(w.run), "--onto", "dequantized"],
        ["--onto dequantized", "unquantized base", "--onto original"],
    ),
    (
        "merge-onto-unknown",
        lambda w: ["merge", "--out", str(w.root / "m"), "--run", str(w.run), "--onto", "packed"],
        ["--onto 'packed'", "original, dequantized"],
    ),
    (
        "merge-latest-run-not-utf8",
        _latest_run_bytes(["merge"]),
        ["latest_run: the latest-run record is empty or not UTF-8 text", "--run RUN_DIR"],
    ),
    # --- export
    (
        "export-unknown-format",
        lambda w: ["export", "--format", "onnx", "--out", str(w.root / "x"), "--run", str(w.run)],
        ["'onnx'", "peft-lora"],
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
    (
        "export-gguf-bad-dtype",
        lambda w: [
            "export",
            "--format",
            "gguf",
            "--out",
            str(w.root / "m.gguf"),
            "--run",
            str(w.run),
            "--dtype",
            "q4",
        ],
        ["--dtype 'q4'", "f16, bf16, q8_0"],
    ),
    (
        "export-gguf-out-is-a-directory",
        lambda w: ["export", "--format", "gguf", "--out", str(w.root), "--run", str(w.run)],
        ["is a directory", "model.gguf"],
    ),
    (
        "export-dtype-without-gguf",
        lambda w: ["export", "--out", str(w.root / "x"), "--run", str(w.run), "--dtype", "f16"],
        ["--dtype applies to --format gguf only"],
    ),
    (
        "export-latest-run-not-utf8",
        _latest_run_bytes(["export"]),
        ["latest_run: the latest-run record is empty or not UTF-8 text", "--run RUN_DIR"],
    ),
    # --- early stopping and the best adapter
    (
        "train-keep-best-without-validation",
        _train_set("train.keep_best=true"),
        ["train.keep_best follows val_loss", "data.val_samples"],
    ),
    (
        "train-patience-without-eval-every",
        _train_set("data.val_samples=2", "train.early_stopping_patience=2"),
        ["train.early_stopping_patience counts validations", "train.eval_every"],
    ),
    ("train-patience-zero", _train_set("train.early_stopping_patience=0"), ["train.early_stopping_patience"]),
    # --- chat
    (
        "chat-sampling-option-while-greedy",
        lambda w: ["chat", "--run", str(w.run), "--prompt", "hi", "--top-p", "0.9"],
        ["--top-p applies to sampling", "--temperature"],
    ),
    (
        "chat-unknown-prompt-format",
        lambda w: ["chat", "--run", str(w.run), "--prompt", "hi", "--prompt-format", "xml"],
        ["--prompt-format 'xml'", "auto, chat, alpaca"],
    ),
    (
        "chat-missing-run",
        lambda w: ["chat", "--run", str(w.root / "nope"), "--prompt", "hi"],
        ["nope", "no such run"],
    ),
    (
        "chat-max-new-tokens-over-the-context",
        lambda w: ["chat", "--run", str(w.run), "--prompt", "hi", "--max-new-tokens", "5000"],
        ["--max-new-tokens 5000", "context is 512 tokens"],
    ),
    # --- inspect and compare
    (
        "inspect-not-a-run",
        lambda w: ["inspect", str(w.root / "nope"), "--out", str(w.root / "o")],
        ["nope: no such run directory"],
    ),
    ("inspect-corrupt-weights", _inspect_corrupt, ["corrupt", "safetensors"]),
    (
        "compare-unknown-method",
        lambda w: ["compare", str(w.cfg), "--methods", "abba,qlora", "--out", str(w.root / "c")],
        ["--methods 'abba,qlora': unknown method qlora; valid: abba, lora, hira"],
    ),
    (
        "compare-set-for-a-method-not-compared",
        lambda w: [
            "compare",
            str(w.cfg),
            "--methods",
            "abba,lora",
            "--set",
            "hira:train.lr=1",
            "--out",
            str(w.root / "c"),
        ],
        ["'hira' is not one of the compared methods (abba, lora)"],
    ),
    (
        "compare-without-validation-data",
        lambda w: ["compare", str(w.cfg), "--set", "eval.tasks=[boolq]", "--out", str(w.root / "c")],
        ["abba compare needs validation data", "data.val_samples"],
    ),
    # --- errors the option parser catches before any command runs
    (
        "eval-limit-zero",
        lambda w: ["eval", "--task", "gsm8k", "--limit", "0"],
        ["--limit", "greater than or equal to 1"],
    ),
    ("train-no-config", lambda w: ["train"], ["train: Missing argument 'config'"]),
    ("unknown-command", lambda w: ["trian"], ["No such command 'trian'"]),
]


def _case_fields(case) -> tuple:
    """(id, builder, expected) of a plain case tuple or of a pytest.param (a case with marks)."""
    return tuple(case.values) if hasattr(case, "marks") else case


def _as_param(case) -> object:
    name, build, expected = _case_fields(case)
    return pytest.param(build, expected, id=name, marks=getattr(case, "marks", ()))


@pytest.mark.parametrize("build,expected", [_as_param(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world: World, build, expected: list[str]) -> None:
    args = build(world)
    before = _tree(world.root, world.model, world.other_model)

    result = cli(*args)

    errors = _error_lines(result.stderr)
    assert result.exit_code == 2, (result.exit_code, result.output, repr(result.exception))
    assert len(errors) == 1, errors
    line = errors[0]
    assert line.startswith("error: "), line
    for text in expected:
        assert text in line, (text, line)
    assert "Traceback" not in result.output
    assert _tree(world.root, world.model, world.other_model) == before


def test_every_cli_command_has_a_bad_input_case(
    tmp_path, tiny_model_dir, tiny_model_dir_other, finished_run
) -> None:
    """The commands come from the real CLI (what `abba --help` lists), and each case's command is the one its
    builder actually invokes, each built in a world of its own: a new command without a case fails here."""
    from typer.main import get_command

    commands = set(get_command(app).commands)
    invoked = set()
    for i, case in enumerate(CASES):
        _, build, _ = _case_fields(case)
        w = _make_world(tmp_path / str(i), tiny_model_dir, tiny_model_dir_other, finished_run)
        invoked.add(next(arg for arg in build(w) if not arg.startswith("-")))
    assert commands >= {"train", "validate", "eval", "merge", "export"}
    assert commands <= invoked, commands - invoked


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
