"""Run configs: validation errors through the CLI, --set overrides, and every shipped YAML."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from helpers import cli

from abba_cli.config import load_config
from abba_cli.errors import UserError
from abba_cli.util.yaml_file import read_yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))

MINIMAL = {"model": {"name_or_path": "x"}, "data": {"recipe": "gsm8k_bundled_train"}, "output_dir": "runs/x"}


def _write(tmp_path: Path, raw: dict | str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def _cli_error(args: list[str]) -> str:
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # one line, no traceback
    return lines[0]


@pytest.mark.parametrize("command", ["train", "validate"])
def test_unknown_key_names_file_and_dotted_key(tmp_path, command):
    path = _write(tmp_path, {**MINIMAL, "train": {"lrr": 0.1}})
    line = _cli_error([command, str(path)])
    assert str(path) in line and "train.lrr" in line and "unknown key" in line


def test_wrong_type_names_key_and_value(tmp_path):
    path = _write(tmp_path, {**MINIMAL, "train": {"lr": "fast"}, "adapter": {"r1": "big"}})
    line = _cli_error(["train", str(path)])
    assert str(path) in line
    assert "train.lr" in line and "'fast'" in line
    assert "adapter.r1" in line and "'big'" in line  # every problem at once


def test_bad_choice_lists_valid_values(tmp_path):
    path = _write(tmp_path, {**MINIMAL, "train": {"scheduler": "exp"}})
    line = _cli_error(["validate", str(path)])
    assert "train.scheduler" in line and "linear" in line and "cosine" in line


def test_missing_file(tmp_path):
    line = _cli_error(["train", str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in line and "not found" in line


def test_yaml_syntax_error_names_line(tmp_path):
    path = _write(tmp_path, "model:\n  name_or_path: x\ntrain: [unclosed\n")
    line = _cli_error(["train", str(path)])
    assert str(path) in line and "YAML syntax error" in line and "line" in line


def test_missing_required_key(tmp_path):
    raw = dict(MINIMAL)
    del raw["output_dir"]
    line = _cli_error(["train", str(_write(tmp_path, raw))])
    assert "output_dir" in line and "missing" in line


def test_bad_set_syntax(tmp_path):
    line = _cli_error(["train", str(_write(tmp_path, MINIMAL)), "--set", "train.lr"])
    assert "--set" in line and "KEY=VALUE" in line


def test_set_overrides_scalars_lists_floats_null(tmp_path):
    path = _write(tmp_path, {**MINIMAL, "train": {"save_every": 10}})
    cfg = load_config(
        path,
        [
            "train.lr=5e-4",
            "train.warmup_ratio=0.1",
            "train.save_every=null",
            "train.max_grad_norm=null",
            "adapter.target_modules=[q_proj, v_proj]",
            "adapter.r1=8",
            "train.gradient_checkpointing=true",
            "output_dir=elsewhere",
            "eval.tasks=[gsm8k,math]",
        ],
    )
    assert cfg.train.lr == pytest.approx(5e-4)
    assert cfg.train.warmup_ratio == pytest.approx(0.1)
    assert cfg.train.save_every is None and cfg.train.max_grad_norm is None
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.adapter.r1 == 8 and cfg.adapter.r2 == 16
    assert cfg.train.gradient_checkpointing is True
    assert cfg.output_dir == "elsewhere"
    assert cfg.eval.tasks == ["gsm8k", "math"]


def test_set_override_is_validated(tmp_path):
    with pytest.raises(UserError, match=r"train\.micro_batch_size"):
        load_config(_write(tmp_path, MINIMAL), ["train.micro_batch_size=0"])
    with pytest.raises(UserError, match=r"train\.nope: unknown key"):
        load_config(_write(tmp_path, MINIMAL), ["train.nope=1"])


def test_validate_prints_resolved_config_and_trainable_summary(tmp_path, tiny_model_dir):
    raw = {**MINIMAL, "model": {"name_or_path": str(tiny_model_dir)}, "adapter": {"r1": 2, "r2": 2}}
    result = cli(*["validate", str(_write(tmp_path, raw)), "--set", "train.lr=2e-4"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout.split("# abba adapters")[0])
    assert resolved["train"]["lr"] == pytest.approx(2e-4)
    # defaults are filled in: ABBA alpha 16, i.e. s = 16^2 / sqrt(2 * 2) = 128 at these tiny ranks
    assert resolved["adapter"]["alpha"] == 16.0
    assert "trainable" in result.stdout and "14 linear layers" in result.stdout
    # which exact path each layer runs, at the full micro-batch (MINIMAL: no dropout)
    plan = result.stdout.split("ABBA execution at")[1]
    assert sum(int(k) for k in re.findall(r" on (\d+) \(", plan)) == 14


def test_configs_exist():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    for name in (
        "quickstart.yaml",
        "mistral_metamath.yaml",
        "gemma2-9b_metamath.yaml",
        "llama3.2-1b_commonsense.yaml",
        "llama3.2-3b_commonsense.yaml",
        "baselines/mistral_metamath_lora.yaml",
        "baselines/mistral_metamath_hira.yaml",
    ):
        assert name in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_shipped_config_validates(path):
    from abba_cli.data.recipes import load_recipe

    cfg = load_config(path)
    load_recipe(cfg.data.recipe)
    for task in cfg.eval.tasks:
        load_recipe(task)


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "baselines"], ids=lambda p: p.stem)
def test_baselines_differ_only_in_adapter(path):
    abba_name = path.stem.rsplit("_", 1)[0] + ".yaml"
    base = load_config(ROOT / "configs" / abba_name).model_dump()
    other = load_config(path).model_dump()
    assert other["adapter"]["type"] in ("lora", "hira") and other["adapter"]["r"] == 32
    assert base["adapter"]["r1"] == base["adapter"]["r2"] == 16
    for section in ("model", "data", "train", "eval"):
        assert other[section] == base[section], section
    assert other["output_dir"] != base["output_dir"]


def test_paper_hyperparameters():
    """What the authors ran: Table 10 of the ABBA paper and their released scripts (see each config's sources)."""
    from abba_cli.adapters.abba import abba_scaling

    for name in (
        "llama3.2-1b_commonsense",
        "llama3.2-3b_commonsense",
        "mistral_metamath",
        "gemma2-9b_metamath",
    ):
        a = load_config(ROOT / "configs" / f"{name}.yaml").adapter
        # --lora_alpha=32 in the released scripts, s = sqrt(alpha1) * sqrt(alpha2) = 32; no adapter dropout ran.
        assert (a.r1, a.r2, a.dropout) == (16, 16, 0.0)
        assert abba_scaling(a.alpha, a.r1, a.r2, a.scaling) == 32.0
    for name in ("llama3.2-1b_commonsense", "llama3.2-3b_commonsense"):
        c = load_config(ROOT / "configs" / f"{name}.yaml")
        t = c.train
        assert (t.micro_batch_size, t.grad_accum_steps, t.epochs, t.lr, t.scheduler, t.warmup_ratio) == (
            6,
            24,
            2,
            1e-3,
            "linear",
            0.02,
        )
        assert (c.data.max_seq_len, c.data.recipe) == (256, "commonsense170k")
    for name in ("mistral_metamath", "gemma2-9b_metamath"):
        c = load_config(ROOT / "configs" / f"{name}.yaml")
        t = c.train
        assert (t.micro_batch_size, t.grad_accum_steps, t.epochs, t.lr, t.scheduler, t.warmup_ratio) == (
            1,
            32,
            1,
            1e-3,
            "cosine",
            0.02,
        )
        assert (c.data.max_seq_len, c.data.num_samples, c.data.recipe) == (512, 20000, "metamathqa")


def test_quickstart_train_and_eval_slices_are_disjoint():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    assert cfg.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # commonsense_bundled_train trains on rows 200+ of each set; the quickstart evaluates rows below that.
    from abba_cli.data.recipes import load_recipe

    mix = load_recipe(cfg.data.recipe).mix
    assert mix is not None and set(cfg.eval.tasks) <= set(mix.recipes)
    assert cfg.eval.limit is not None
    assert cfg.eval.skip + cfg.eval.limit <= mix.skip_per_recipe


def test_validate_reads_no_weights_and_counts_like_a_real_load(tmp_path, tiny_model_dir):
    """validate builds the model on the meta device: a folder with config + tokenizer but no weights is enough
    (a 9B config validates on a laptop), and the parameter summary equals a real load's."""
    import shutil

    from abba_cli.adapters import inject_adapters, trainable_summary
    from abba_cli.config import AdapterConfig
    from abba_cli.models.loading import load_base

    weightless = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    raw = {**MINIMAL, "model": {"name_or_path": str(weightless)}, "adapter": {"r1": 3, "r2": 5}}
    result = cli(*["validate", str(_write(tmp_path, raw))])
    assert result.exit_code == 0, result.output

    model, _ = load_base(str(tiny_model_dir))
    inject_adapters(model, AdapterConfig(r1=3, r2=5))
    assert str(trainable_summary(model)) in result.stdout

    raw["adapter"] = {"r1": 65, "r2": 2}  # rank limits are still checked on the meta model
    result = cli(*["validate", str(_write(tmp_path, raw))])
    assert result.exit_code == 2 and "adapter.r1=65 is larger" in result.stderr


# ----------------------------------------------------------------------------------------- hostile config files


def test_non_utf8_config_names_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"model:\n  name_or_path: x\ndata: {recipe: caf\xe9}\noutput_dir: runs/x\n")
    line = _cli_error(["train", str(path)])
    assert line == f"error: {path}: line 3: byte 0xe9 is not UTF-8; save the file as UTF-8"


@pytest.mark.parametrize(
    "text,key,line,first",
    [
        ("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", "lr", 4, 2),
        ("train: {lr: 0.1}\nadapter: {r1: 2}\ntrain: {lr: 0.2}\n", "train", 3, 1),
    ],
    ids=["nested", "section"],
)
def test_duplicate_yaml_key_names_key_and_both_lines(tmp_path, text, key, line, first):
    head = "model: {name_or_path: x}\ndata: {recipe: gsm8k}\noutput_dir: runs/x\n"
    path = _write(tmp_path, head + text)
    got = _cli_error(["validate", str(path)])
    assert f"line {line + 3}: key {key!r} is given twice (first on line {first + 3})" in got
    assert str(path) in got


def test_yaml_merge_key_may_override_what_it_merges(tmp_path):
    """`<<: *base` then a key of its own is how YAML extends a mapping, not a duplicate."""
    text = (
        "base: &base {lr: 0.1, epochs: 3}\n"
        "model: {name_or_path: x}\ndata: {recipe: gsm8k}\noutput_dir: runs/x\n"
        "train:\n  <<: *base\n  lr: 0.5\n"
    )
    raw = read_yaml(_write(tmp_path, text))
    assert raw["train"] == {"lr": 0.5, "epochs": 3}


def test_directory_instead_of_config_says_what_to_pass(tmp_path):
    empty = tmp_path / "somedir"
    empty.mkdir()
    line = _cli_error(["train", str(empty)])
    assert line == f"error: {empty} is a directory, not a config file; pass a run config YAML (see configs/)"

    run = tmp_path / "run"
    run.mkdir()
    _write(run, MINIMAL, "config.yaml")
    line = _cli_error(["train", str(run), "--resume"])
    assert f"{run} is a directory" in line and f"pass {run / 'config.yaml'}" in line and "--resume" in line


@pytest.mark.parametrize("spelling", ["no", "off", "'no'", "false"])
def test_mixed_precision_no_is_accepted_unquoted(tmp_path, spelling):
    """YAML 1.1 reads a bare `no` as false; in the file and in --set it still means mixed_precision "no"."""
    text = yaml.safe_dump(MINIMAL) + f"train:\n  mixed_precision: {spelling}\n"
    assert load_config(_write(tmp_path, text)).train.mixed_precision == "no"
    raw = {**MINIMAL, "train": {"mixed_precision": "bf16"}}
    cfg = load_config(_write(tmp_path, raw, "bf16.yaml"), [f"train.mixed_precision={spelling}"])
    assert cfg.train.mixed_precision == "no"


def test_mixed_precision_yes_is_still_refused(tmp_path):
    line = _cli_error(["validate", str(_write(tmp_path, MINIMAL)), "--set", "train.mixed_precision=yes"])
    assert "train.mixed_precision" in line and "'bf16'" in line and "(got True)" in line


@pytest.mark.parametrize(
    "key",
    [
        "train.lr",
        "train.epochs",
        "train.warmup_ratio",
        "train.weight_decay",
        "train.max_grad_norm",
        "adapter.alpha",
        "adapter.dropout",
    ],
)
@pytest.mark.parametrize("value", ["nan", ".nan", ".inf", "-.inf", "1e400"])
def test_non_finite_floats_are_reported_as_such(tmp_path, key, value):
    line = _cli_error(["validate", str(_write(tmp_path, MINIMAL)), "--set", f"{key}={value}"])
    assert f"{key}: must be a finite number (got " in line
    assert "less than" not in line and "greater than" not in line


def test_tilde_in_paths_is_the_home_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    raw = {
        "model": {"name_or_path": "~/models/base"},
        "data": {
            "recipe": "~/recipes/mine.yaml",
            "path": "~/data/train.jsonl",
            "val_path": "~/data/val.jsonl",
        },
        "output_dir": "~/runs/x",
    }
    cfg = load_config(_write(tmp_path, raw))
    assert cfg.model.name_or_path == f"{home}/models/base"
    assert cfg.data.recipe == f"{home}/recipes/mine.yaml"
    assert cfg.data.path == f"{home}/data/train.jsonl"
    assert cfg.data.val_path == f"{home}/data/val.jsonl"
    assert cfg.output_dir == f"{home}/runs/x"
    # --set gets the same treatment; a hub id and a relative path are left as they are
    cfg = load_config(_write(tmp_path, raw), ["output_dir=~/elsewhere", "model.name_or_path=org/model-~1"])
    assert cfg.output_dir == f"{home}/elsewhere" and cfg.model.name_or_path == "org/model-~1"
    cfg = load_config(_write(tmp_path, raw), ["output_dir=runs/~x"])
    assert cfg.output_dir == "runs/~x"


def test_attn_implementation_choices_are_transformers_own():
    """Every value the schema accepts is one transformers 5 knows (eager, or a registered attention function)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from abba_cli.config import ATTN_IMPLEMENTATIONS

    known = {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()}
    assert set(ATTN_IMPLEMENTATIONS) <= known
    assert {"eager", "sdpa", "flash_attention_2", "flex_attention"} <= set(ATTN_IMPLEMENTATIONS)


def test_bogus_attn_implementation_names_its_own_key(tmp_path):
    line = _cli_error(["train", str(_write(tmp_path, MINIMAL)), "--set", "model.attn_implementation=bogus"])
    assert "model.attn_implementation" in line and "'sdpa'" in line and "(got 'bogus')" in line
    assert "name_or_path" not in line


def test_train_with_tilde_output_dir_writes_under_home(tmp_path, monkeypatch, tiny_model_dir):
    """End to end: the run lands in $HOME/runs/t, and no literal `~` folder appears in the working directory."""
    import json

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2\n#### 2"}) + "\n")
    raw = {
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
        "adapter": {"r1": 2, "r2": 2, "target_modules": ["q_proj"]},
        "data": {"recipe": "gsm8k", "path": str(data), "max_seq_len": 64},
        "train": {"max_steps": 1},
        "output_dir": "~/runs/t",
    }
    result = cli(*["train", str(_write(tmp_path, raw))])
    assert result.exit_code == 0, result.output
    assert (home / "runs" / "t" / "adapter_model.safetensors").is_file()
    assert not (cwd / "~").exists()
