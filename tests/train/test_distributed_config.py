"""The `distributed` section: validation, agreement with an Accelerate config file, the engine plugins."""

from __future__ import annotations

import importlib.util

import pytest
from helpers import cli, cli_error_line, tiny_config, tiny_raw_config

from abba_cli.config import validate_config
from abba_cli.errors import UserError
from abba_cli.models import loading as models
from abba_cli.train import distributed

ENGINE_ENV = [
    "ACCELERATE_USE_FSDP",
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "FSDP_VERSION",
]


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch):
    for name in ENGINE_ENV:
        monkeypatch.delenv(name, raising=False)


def _cfg(tmp_path, model_dir, **distributed_section):
    raw = tiny_raw_config(tmp_path, model_dir)
    if distributed_section:
        raw["distributed"] = distributed_section
    return validate_config(raw, "run.yaml")


def test_ddp_is_the_default(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir)
    assert cfg.distributed.strategy == "ddp"
    assert distributed.resolve_strategy(cfg) == "ddp"
    assert distributed.accelerator_plugins(cfg, "ddp") == {}


@pytest.mark.parametrize(
    "section, message",
    [
        ({"strategy": "zero1"}, "distributed.strategy: Input should be 'ddp', 'fsdp', 'zero2' or 'zero3'"),
        ({"offload_params": True}, "need strategy fsdp, zero2 or zero3"),
        ({"strategy": "zero2", "offload_params": True}, "offload_params needs zero3 or fsdp"),
        ({"strategy": "fsdp", "offload_params": True}, "set offload_params and offload_optimizer both"),
        ({"strategy": "zero3", "wrap_layers": ["LlamaDecoderLayer"]}, "wrap_layers is an fsdp setting"),
        ({"stratgy": "fsdp"}, "distributed.stratgy: unknown key (valid keys: strategy,"),
    ],
)
def test_bad_distributed_settings_are_one_line(tmp_path, tiny_model_dir, section, message):
    with pytest.raises(UserError) as err:
        _cfg(tmp_path, tiny_model_dir, **section)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_accelerate_config_file_chooses_when_the_run_config_does_not(
    tmp_path, tiny_model_dir, monkeypatch
):
    cfg = _cfg(tmp_path, tiny_model_dir)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert distributed.resolve_strategy(cfg) == "fsdp"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert distributed.resolve_strategy(cfg) == "zero3"
    # ... and agrees when both choose the same engine.
    assert distributed.resolve_strategy(_cfg(tmp_path, tiny_model_dir, strategy="zero3")) == "zero3"


@pytest.mark.parametrize(
    "env, strategy, message",
    [
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            "fsdp",
            "distributed.strategy 'fsdp' contradicts the Accelerate config (ACCELERATE_USE_DEEPSPEED=true, ZeRO stage 3)",
        ),
        (
            {"ACCELERATE_USE_FSDP": "true"},
            "zero2",
            "distributed.strategy 'zero2' contradicts the Accelerate config",
        ),
        (
            {"ACCELERATE_USE_FSDP": "true"},
            "ddp",
            "distributed.strategy 'ddp' contradicts the Accelerate config",
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"},
            None,
            "abba supports DeepSpeed ZeRO stages 2 and 3",
        ),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, None, "set fsdp_version: 2"),
    ],
)
def test_a_contradiction_with_the_accelerate_config_is_one_line(
    tmp_path, tiny_model_dir, monkeypatch, env, strategy, message
):
    cfg = _cfg(tmp_path, tiny_model_dir, **({"strategy": strategy} if strategy else {}))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError) as err:
        distributed.resolve_strategy(cfg)
    assert message in str(err.value)


def test_a_missing_engine_names_the_extra_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the problem was reported")

    monkeypatch.setattr(models, "load_configured_base", refuse)
    result = cli("train", tiny_config(tmp_path, tiny_model_dir), "--set", "distributed.strategy=zero3")
    assert result.exit_code == 2
    line = cli_error_line(result)
    assert "distributed.strategy zero3: DeepSpeed is not installed; pip install 'abba-cli[deepspeed]'" in line


def test_fsdp_plugin_is_fsdp2_wrapping_decoder_layers(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, strategy="fsdp", wrap_layers=["LlamaDecoderLayer"])
    plugin = distributed.accelerator_plugins(cfg, "fsdp")["fsdp_plugin"]
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_plugin_has_concrete_batch_sizes(tmp_path, tiny_model_dir):
    """No dataloader reaches prepare(): an `auto` micro-batch size would make DeepSpeed's prepare raise."""
    raw = tiny_raw_config(tmp_path, tiny_model_dir, train={"micro_batch_size": 3, "grad_accum_steps": 5})
    raw["distributed"] = {"strategy": "zero3", "offload_optimizer": True, "offload_params": True}
    cfg = validate_config(raw)
    plugin = distributed.deepspeed_plugin(cfg, "zero3")
    ds = plugin.deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 1.0  # train.max_grad_norm, clipped by the engine on the global norm
