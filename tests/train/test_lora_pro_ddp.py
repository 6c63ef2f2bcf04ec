"""LoRA-Pro under DDP: 2 CPU processes (torchrun, gloo) end at the adapter of one process with the same global
batch. DDP all-reduces the LoRA gradients before the step, so every process solves the same closed form on the
same numbers; the tolerance is the one tests/test_distributed.py explains (the same sums in another order)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import UNSET, subprocess_env, tiny_config
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("abba_worker.py")
TIMEOUT_S = 300


def _config(tmp: Path, model_dir: Path, out: str, accum: int) -> Path:
    rows = [
        {"question": "Natalia sold clips" + " to friends" * (i % 4) + f" {i}?", "answer": f"#### {i}"}
        for i in range(8)
    ]
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tiny_config(
        tmp,
        model_dir,
        out,
        adapter={
            "type": "lora_pro",
            "r": 2,
            "alpha": 4,
            "r1": UNSET,
            "r2": UNSET,
            "target_modules": ["q_proj", "down_proj"],
        },
        data={"path": str(tmp / "rows.jsonl")},
        train={"max_steps": 3, "micro_batch_size": 1, "grad_accum_steps": accum, "lr": 1e-3},
    )


def test_two_ddp_processes_match_one(tiny_model_dir, tmp_path):
    env = subprocess_env(tmp_path, ACCELERATE_USE_CPU="true")
    one = subprocess.run(
        [sys.executable, str(WORKER), "train", str(_config(tmp_path, tiny_model_dir, "one", accum=4))],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
    ]
    two = subprocess.run(
        [*launch, "train", str(_config(tmp_path, tiny_model_dir, "two", accum=2))],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 process(es) (DDP)" in two.stderr
    ref = load_file(tmp_path / "one" / "adapter_model.safetensors")
    got = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert sorted(ref) == sorted(got)
    assert any(float(v.abs().max()) > 0 for k, v in ref.items() if k.endswith(".B"))  # it trained
    for key in ref:
        scale = float(ref[key].abs().max())
        assert float((got[key] - ref[key]).abs().max()) <= 1e-4 * scale, key
