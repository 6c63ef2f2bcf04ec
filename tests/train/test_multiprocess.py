"""Several processes: 2 CPU processes (gloo) train the same adapter as 1 process with the same global batch.

`accelerate launch --cpu --num_processes 2` starts ONE process on CPU (accelerate's simple launcher only fans
out through mpirun), so the test uses torchrun, which `accelerate launch --multi_gpu` also uses, with
ACCELERATE_USE_CPU=true: Accelerate then selects DistributedType.MULTI_CPU with the gloo backend.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import subprocess_env, tiny_config
from safetensors.torch import load_file

# Seconds before a hung run fails the test (each run takes a few seconds; gloo hangs forever on a lost peer).
TIMEOUT_S = 240


def _config(tmp_path: Path, model_dir: Path, out: str, accum: int) -> Path:
    data = tmp_path / "data.jsonl"
    # Different lengths: each process sees a different number of target tokens, so the loss normalisation
    # must be global for the two runs to agree.
    rows = [
        {
            "question": "Natalia sold clips" + " to friends" * (i % 4) + f" {i}?",
            "answer": f"{'so ' * (i % 3)}#### {i}",
        }
        for i in range(11)  # 3 held out for validation (data.val_samples), 8 trained on
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = {
        "max_steps": 3,
        "micro_batch_size": 1,
        "grad_accum_steps": accum,
        "save_every": 3,
        "eval_every": 1,
    }
    return tiny_config(
        tmp_path,
        model_dir,
        out,
        adapter={"target_modules": ["q_proj", "v_proj", "down_proj"]},
        data={"path": str(data), "val_samples": 3},
        train=train,
    )


_env = subprocess_env


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("mp")
    one = _config(tmp, tiny_model_dir, "one", accum=2)  # micro 1 x accum 2 x 1 process
    two = _config(tmp, tiny_model_dir, "two", accum=1)  # micro 1 x accum 1 x 2 processes
    p1 = subprocess.run(
        [sys.executable, "-m", "abba_cli", "train", str(one)],
        env=_env(tmp),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert p1.returncode == 0, p1.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    p2 = subprocess.run(
        [*launch, "-m", "abba_cli", "train", str(two)],
        env=_env(tmp, ACCELERATE_USE_CPU="true"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert p2.returncode == 0, p2.stderr[-3000:]
    return tmp / "one", tmp / "two", p2.stderr + p2.stdout


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    one, two, log = runs
    assert "x 2 process(es)" in log  # really distributed, not two independent runs
    a = load_file(one / "adapter_model.safetensors")
    b = load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    # B2 starts at zero: a non-zero B2 shows the adapters really trained, so the match is not vacuous.
    assert any(float(a[k].abs().max()) > 0 for k in a if k.endswith(".B2"))
    la = [json.loads(x)["loss"] for x in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert lb == pytest.approx(la, rel=1e-5)
    # 3 validation examples over 2 processes (2 + 1): the token sums are reduced, so val_loss is the same.
    va = [json.loads(x)["val_loss"] for x in (one / "metrics.jsonl").read_text().splitlines()]
    vb = [json.loads(x)["val_loss"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(va) == 3 and vb == pytest.approx(va, rel=1e-5)


@pytest.mark.slow
def test_only_the_main_process_writes(runs):
    _, two, log = runs
    assert log.count("run directory:") == 1  # the summary is printed once
    steps = [json.loads(x)["step"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one line per step, not one per process
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-3"]
    rng = torch.load(two / "checkpoints" / "step-3" / "rng.pt", weights_only=True)
    assert len(rng) == 2  # ... holding every process's RNG state, gathered to the main process
    leftovers = [p.name for p in two.rglob("*") if p.name.startswith(".")]
    assert leftovers == []  # no temporary files from a second writer


def test_adapter_init_does_not_depend_on_the_process_rng(tiny_model_dir):
    """Every process must start from the same factors: the SVD/Kaiming init is seeded per layer, not drawn
    from the global RNG that differs between processes."""
    from transformers import AutoModelForCausalLM

    from abba_cli.adapters import adapter_state_dict, inject_adapters
    from abba_cli.config import AdapterConfig

    cfg = AdapterConfig(type="abba", r1=2, r2=2, target_modules=["q_proj", "down_proj"])
    states = []
    for process_seed in (0, 12345):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        torch.manual_seed(process_seed)  # as if another process had consumed its RNG differently
        torch.rand(100)
        inject_adapters(model, cfg)
        states.append(adapter_state_dict(model))
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
