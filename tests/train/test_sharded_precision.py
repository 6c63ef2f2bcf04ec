"""The precision each engine is configured with (train/precision.py), as Accelerate hands it to the engine.

The 2-process runs that show its effect (a bf16 ABBA run under every engine equal to one process, the adapter
saved in fp32) are in tests/test_distributed.py; these check the configuration itself, in-process, including
the GPU path Accelerate takes (it fills in its own bf16 policy only where none was given).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from abba_cli.config import RunConfig
from abba_cli.errors import UserError
from abba_cli.train.distributed import deepspeed_plugin, fsdp_plugin


@pytest.fixture(autouse=True)
def _restore_environment():
    """The plugins export settings to os.environ (FSDP_*, DS_ACCELERATOR) for the launcher; keep them here."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    if importlib.util.find_spec("deepspeed") is not None:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def _cfg(mixed_precision: str = "bf16") -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"name_or_path": "unused"},
            "adapter": {"r1": 2, "r2": 2},
            "data": {"recipe": "gsm8k"},
            "train": {"mixed_precision": mixed_precision, "grad_accum_steps": 4},
            "output_dir": "unused",
        }
    )


def test_fsdp2_keeps_each_parameters_dtype_and_reduces_in_fp32():
    plugin = fsdp_plugin(_cfg())
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does with mixed_precision bf16 on GPUs
    policy = plugin.mixed_precision_policy
    assert policy.param_dtype is None  # no bf16 copies of the fp32 factors; autocast does the compute cast
    assert policy.reduce_dtype == torch.float32  # reduce-scatter, and no_sync accumulation, in fp32


needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (abba-cli[deepspeed])"
)


@needs_deepspeed
@pytest.mark.parametrize(("mixed_precision", "dtype"), [("bf16", "bfloat16"), ("fp16", "float16")])
def test_deepspeed_autocasts_instead_of_casting_the_parameters(mixed_precision, dtype):
    plugin = deepspeed_plugin(_cfg(mixed_precision), "zero2")
    plugin.set_mixed_precision(mixed_precision)  # what AcceleratorState does for DeepSpeed
    ds = plugin.deepspeed_config
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # no parameter cast
    assert ds["torch_autocast"] == {"enabled": True, "dtype": dtype, "lower_precision_safe_modules": []}
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"


@needs_deepspeed
def test_deepspeed_without_mixed_precision_runs_fp32():
    ds = deepspeed_plugin(_cfg("no"), "zero3").deepspeed_config
    assert "torch_autocast" not in ds and ds["bf16"]["enabled"] is False
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"


@needs_deepspeed
def test_a_deepspeed_file_enabling_bf16_is_refused_and_auto_is_kept_fp32(tmp_path, monkeypatch):
    path = tmp_path / "ds.json"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    with pytest.raises(UserError, match=r"ds\.json: bf16\.enabled is True; .* set it to auto or false"):
        deepspeed_plugin(_cfg(), "zero2")
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}))
    plugin = deepspeed_plugin(_cfg(), "zero2")
    plugin.set_mixed_precision("bf16")
    assert plugin.deepspeed_config["bf16"]["enabled"] is False
    assert plugin.deepspeed_config["torch_autocast"]["enabled"] is True
