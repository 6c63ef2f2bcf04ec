"""DoRA and LoRA-Pro on 2 CPU processes (torchrun, gloo) end at the adapter of one process with the same global
batch: LoRA-Pro under DDP (all-reduced LoRA gradients, so every process solves the same closed form on the same
numbers), DoRA under FSDP2 (its magnitude sharded with the factors, its row norms taken on the gathered weight).
The tolerance is the one tests/train/test_distributed_strategies.py explains: the same sums in another order."""

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
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TIMEOUT_S = 300  # a lost peer hangs gloo forever


def _config(tmp: Path, model_dir: Path, method: str, accum: int) -> Path:
    rows = tmp / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps(
                {"question": "Natalia sold clips" + " to friends" * (i % 4) + f" {i}?", "answer": f"#### {i}"}
            )
            + "\n"
            for i in range(8)
        )
    )
    adapter = {
        "type": method,
        "r": 2,
        "alpha": 4,
        "r1": UNSET,
        "r2": UNSET,
        "target_modules": ["q_proj", "down_proj"],
    }
    return tiny_config(
        tmp,
        model_dir,
        f"{method}-{accum}",
        adapter=adapter,
        data={"path": str(rows)},
        train={"max_steps": 3, "micro_batch_size": 1, "grad_accum_steps": accum, "lr": 1e-3},
    )


def _train_each(tmp: Path, launch: list[str], strategy: str, configs: list[Path]) -> str:
    """Every config trained in turn by one launch (the processes start once); returns its stderr."""
    cmd = [*launch, str(WORKER), "train-each", strategy, *map(str, configs)]
    env = subprocess_env(tmp, ACCELERATE_USE_CPU="true")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stderr


def test_lora_pro_under_ddp_and_dora_under_fsdp_match_one_process(tiny_model_dir, tmp_path):
    one = [_config(tmp_path, tiny_model_dir, method, accum=4) for method in ("lora_pro", "dora")]
    _train_each(tmp_path, [sys.executable], "ddp", one)
    log = _train_each(tmp_path, LAUNCH, "ddp", [_config(tmp_path, tiny_model_dir, "lora_pro", accum=2)])
    assert "x 2 process(es) (DDP)" in log
    log = _train_each(tmp_path, LAUNCH, "fsdp", [_config(tmp_path, tiny_model_dir, "dora", accum=2)])
    assert "x 2 process(es) (FSDP2)" in log
    for method in ("lora_pro", "dora"):
        ref = load_file(tmp_path / f"{method}-4" / "adapter_model.safetensors")
        got = load_file(tmp_path / f"{method}-2" / "adapter_model.safetensors")
        assert sorted(ref) == sorted(got)
        assert any(float(v.abs().max()) > 0 for k, v in ref.items() if k.endswith(".B"))  # it trained
        for key in ref:
            scale = float(ref[key].abs().max())
            assert float((got[key] - ref[key]).abs().max()) <= 1e-4 * scale, (method, key)
