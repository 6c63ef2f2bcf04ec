"""The plan line of `abba train` and `abba validate` price ABBA's paths for the device that will train, resolved by
one function (train/execution_plan.py), and say which constants they used."""

from __future__ import annotations

import pytest
import torch
from helpers import cli, cli_error_line, tiny_config

from abba_cli.train import execution_plan
from abba_cli.train.execution_plan import training_device_type


def test_the_training_device_is_the_one_accelerate_picks(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    assert training_device_type() == "cuda"
    assert training_device_type("cpu") == "cpu"  # abba validate --device
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # accelerate launch --cpu
    assert training_device_type() == "cpu"
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert training_device_type() == "cpu"


def _plan(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("ABBA execution")]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture
def config(tmp_path, tiny_model_dir):
    # 1 x 96 tokens: the CPU constants pick khatri_rao on the tiny layers, the CUDA ones (launch-bound) merged.
    return tiny_config(tmp_path, tiny_model_dir, data={"max_seq_len": 96}, train={"micro_batch_size": 1})


def test_train_and_validate_price_for_the_same_device(config, monkeypatch):
    plans = {}
    for device in ("cpu", "cuda"):
        # Both commands ask this one function: where it says cuda (a GPU machine), both price for cuda.
        monkeypatch.setattr(execution_plan, "training_device_type", lambda d=None, dev=device: d or dev)
        train = cli("train", config, "--dry-run")
        validate = cli("validate", config)
        assert train.exit_code == 0 and validate.exit_code == 0, train.output + validate.output
        plans[device] = _plan(train.output)
        assert _plan(validate.output) == plans[device]
        assert f"priced for {device} with the {device.upper()} constants" in plans[device]
    assert "khatri_rao on 4" in plans["cpu"] and "merged on 4" in plans["cuda"]
    monkeypatch.undo()
    # Here (no GPU) both price for the CPU; --device prices for another device.
    assert _plan(cli("validate", config).output) == plans["cpu"]
    assert _plan(cli("validate", config, "--device", "cuda").output) == plans["cuda"]


def test_validate_refuses_an_unknown_device(config):
    result = cli("validate", config, "--device", "tpu")
    assert result.exit_code == 2
    assert cli_error_line(result) == "error: --device 'tpu': expected one of cuda, cpu"
