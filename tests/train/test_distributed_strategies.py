"""distributed.strategy ddp | fsdp | zero2 | zero3 on 2 CPU processes (torchrun, gloo) with the tiny model.

For each strategy (one launch training ABBA, LoRA and a run stopped by SIGTERM, one more to resume it): the
adapter after 4 steps (accumulation 2, clipping active) matches one process with the same global batch, for ABBA
in bf16 (a bf16 base, bf16 autocast) and LoRA in fp32, and is saved in fp32; a real SIGTERM on one process
mid-run, then --resume, ends at the very adapter of the uninterrupted run; DeepSpeed's engine stepped exactly
once per logged step; zero3's saved adapter holds full, non-empty tensors. DeepSpeed runs on CPU with its CPU
accelerator (DS_ACCELERATOR=cpu, set by abba).

Tolerance against one process: |a - b| <= 1e-4 * max|a| per tensor. The same sums are taken in another order
(one process accumulates 4 micro-batches; 2 processes accumulate 2 and all-reduce / reduce-scatter, ZeRO
averages flat buckets), so float32 round-off differs (1e-7 relative per gradient); AdamW divides by sqrt(v),
which scales that noise up for tiny gradients over 4 steps at lr 1e-2: measured up to 4e-5 (zero3). A
wrong normalisation (a gradient off by the accumulation factor or the process count) shows in the logged
grad_norm, compared at rel 1e-4, and a per-shard clip changes the adapter far beyond it.
In bf16 the same bound holds because every engine keeps the factors fp32 and accumulates and reduces their
gradients in fp32 (train/precision.py), and each micro-batch's bf16 forward is the same on every process: what
differs is again only the fp32 summation order (measured: 0 for DDP, FSDP2 and ZeRO-2, 7e-8 in ZeRO-3's grad
norm). Accumulating or reducing in bf16 instead (an 8-bit mantissa) moved the adapter by 1e-2 to 1e-1.
Resume is compared exactly: the same strategy on the same processes repeats the same operations.

Why torchrun: `accelerate launch --cpu --num_processes 2` starts ONE process on CPU (Accelerate's simple launcher
only fans out through mpirun); torchrun, which `accelerate launch --multi_gpu` also uses, with
ACCELERATE_USE_CPU=true makes Accelerate select multi-CPU gloo, and abba then the engine asked for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import UNSET, subprocess_env, tiny_config
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TIMEOUT_S = 300  # a lost peer hangs gloo forever; a run takes 10-40 s
STRATEGIES = ["ddp", "fsdp", "zero2", "zero3"]
ENGINE = {"ddp": "DDP", "fsdp": "FSDP2", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}
WORKER = Path(__file__).with_name("abba_worker.py")
STEPS = 4


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _rows(path: Path) -> Path:
    # Different lengths: each process sees another number of target tokens, so normalisation must be global.
    rows = [
        {
            "question": "Natalia sold clips" + " to friends" * (i % 4) + f" {i}?",
            "answer": f"{'so ' * (i % 3)}#### {i}",
        }
        for i in range(11)  # 3 held out for validation (split 2 + 1 over the processes), 8 trained on
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp: Path, model_dir: Path, out: str, adapter: str, accum: int) -> Path:
    adapter_cfg = (
        {"type": "abba", "r1": 2, "r2": 2}
        if adapter == "abba"
        else {"type": "lora", "r": 2, "alpha": 4, "r1": UNSET, "r2": UNSET}
    )
    # ABBA trains as users run it on GPUs: a bf16 base under bf16 autocast, fp32 factors.
    bf16 = adapter == "abba"
    return tiny_config(
        tmp,
        model_dir,
        out,
        model={"dtype": "bfloat16" if bf16 else "float32"},
        adapter={**adapter_cfg, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        data={"path": str(_rows(tmp / "rows.jsonl")), "val_samples": 3},
        train={
            "eval_every": 2,
            "mixed_precision": "bf16" if bf16 else "no",
            "max_steps": STEPS,
            "micro_batch_size": 1,
            "grad_accum_steps": accum,
            "save_every": 2,
            "max_grad_norm": 0.1,  # below the gradient norms seen here (0.1-0.3): clipping is active
        },
    )


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    return subprocess_env(tmp, ACCELERATE_USE_CPU="true", **extra)


LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _torchrun(tmp: Path, config: Path, strategy: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [*LAUNCH, str(WORKER), "train", str(config), "--set", f"distributed.strategy={strategy}", *args]
    return subprocess.run(cmd, env=_env(tmp, **env), capture_output=True, text=True, timeout=TIMEOUT_S)


def _train_each(tmp: Path, strategy: str, configs: list[Path], launch: list[str], **env: str):
    """Every config trained in turn by one launch (the processes start once)."""
    cmd = [*launch, str(WORKER), "train-each", strategy, *map(str, configs)]
    return subprocess.run(cmd, env=_env(tmp, **env), capture_output=True, text=True, timeout=TIMEOUT_S)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """One process, micro-batch 1 x accumulation 4: the global batch of 2 processes x 1 x 2."""
    tmp = tmp_path_factory.mktemp("single")
    configs = [
        _config(tmp, tiny_model_dir, f"one-{adapter}", adapter, accum=4) for adapter in ("abba", "lora")
    ]
    p = _train_each(tmp, "ddp", configs, [sys.executable])
    assert p.returncode == 0, p.stderr[-3000:]
    return {adapter: tmp / f"one-{adapter}" for adapter in ("abba", "lora")}


@pytest.fixture(scope="module", params=STRATEGIES)
def two(request, tiny_model_dir, tmp_path_factory) -> dict:
    """Per strategy: uninterrupted ABBA and LoRA runs, and an ABBA run stopped by SIGTERM then resumed."""
    strategy = request.param
    if strategy.startswith("zero") and not _has_deepspeed():
        pytest.skip("DeepSpeed is not installed (pip install 'abba-cli[deepspeed]'; make test installs it)")
    tmp = tmp_path_factory.mktemp(strategy)
    out: dict = {"strategy": strategy}
    configs = [_config(tmp, tiny_model_dir, adapter, adapter, accum=2) for adapter in ("abba", "lora")]
    config = _config(tmp, tiny_model_dir, "stopped", "abba", accum=2)
    # One launch trains ABBA, LoRA, then the run stopped by SIGTERM: rank 1's 5th micro-batch of that run is in
    # step 3, so both processes finish step 3, checkpoint, and exit 143.
    stop = _train_each(
        tmp, strategy, [*configs, config], LAUNCH, ABBA_TEST_SIGTERM_AT="5", ABBA_TEST_SIGTERM_RUN="stopped"
    )
    assert stop.returncode != 0 and f"stopped by SIGTERM after step 3/{STEPS}" in stop.stderr, stop.stderr[
        -4000:
    ]
    out["abba"], out["lora"], out["log"] = tmp / "abba", tmp / "lora", stop.stderr + stop.stdout
    out["checkpoints_at_stop"] = sorted(p.name for p in (tmp / "stopped" / "checkpoints").iterdir())
    resumed = _torchrun(tmp, config, strategy, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stderr and "step-3" in resumed.stderr
    out["stopped"] = tmp / "stopped"
    return out


def _close(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key].shape == ref[key].shape, key
        scale = float(ref[key].abs().max())
        assert float((got[key] - ref[key]).abs().max()) <= 1e-4 * max(scale, 1e-6), key


@pytest.mark.parametrize("adapter", ["abba", "lora"])
def test_two_processes_match_one_with_the_same_global_batch(two, single, adapter):
    # Really this engine on 2 processes (Accelerate's own state; on CPU it would otherwise fall back to DDP).
    assert f"x 2 process(es) ({ENGINE[two['strategy']]})" in two["log"]
    ref = load_file(single[adapter] / "adapter_model.safetensors")
    got = load_file(two[adapter] / "adapter_model.safetensors")
    assert {str(v.dtype) for v in got.values()} == {"torch.float32"}  # fp32 under every engine, bf16 runs too
    _close(got, ref)
    # The factor that starts at zero moved: the adapters trained, so the match is not vacuous.
    zero_start = ".B2" if adapter == "abba" else ".B"
    assert any(float(v.abs().max()) > 0 for k, v in ref.items() if k.endswith(zero_start))
    m1, m2 = _metrics(single[adapter]), _metrics(two[adapter])
    assert [r["step"] for r in m2] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):  # the global norm, before clipping, and the globally normalised loss
        assert [r[key] for r in m2] == pytest.approx([r[key] for r in m1], rel=1e-4)
    assert max(r["grad_norm"] for r in m1) > 0.1  # so clipping acted
    # 3 validation examples over 2 processes (2 + 1): the token sums are reduced, so val_loss is the same.
    v1, v2 = ([r["val_loss"] for r in m if "val_loss" in r] for m in (m1, m2))
    assert len(v1) == 2 and v2 == pytest.approx(v1, rel=1e-4)


def test_only_the_main_process_writes(two):
    assert two["log"].count("run directory:") == 2  # once by each finished run, not per process
    run = two["abba"]
    assert [r["step"] for r in _metrics(run)] == list(
        range(1, STEPS + 1)
    )  # one line per step, not per process
    rng = torch.load(run / "checkpoints" / f"step-{STEPS}" / "rng.pt", weights_only=True)
    assert len(rng) == 2  # every process's RNG state, gathered to the main process
    leftovers = [p.name for p in run.rglob("*") if p.name.startswith(".")]
    assert leftovers == []  # no temporary files from a second writer


def test_sigterm_then_resume_ends_at_the_uninterrupted_adapter(two):
    assert "step-3" in two["checkpoints_at_stop"]
    a = load_file(two["abba"] / "adapter_model.safetensors")
    b = load_file(two["stopped"] / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in _metrics(two["stopped"])] == [r["loss"] for r in _metrics(two["abba"])]


def test_the_checkpoint_holds_what_the_engine_needs(two):
    step = two["abba"] / "checkpoints" / f"step-{STEPS}"
    tensors = load_file(step / "adapter_model.safetensors")
    assert tensors and all(t.numel() > 0 and t.dtype == torch.float32 for t in tensors.values())
    if two["strategy"].startswith("zero"):
        engine = step / "engine"
        assert sorted(p.name for p in engine.glob("*optim_states.pt")) == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
        model_states = next(engine.glob("*model_states.pt"))
        saved = torch.load(model_states, map_location="cpu", weights_only=False)
        assert saved["global_steps"] == STEPS  # the engine stepped once per logged step, not per micro-batch
    else:
        optimizer = torch.load(step / "optimizer.pt", map_location="cpu", weights_only=True)
        assert len(optimizer["state"]) == len(tensors)  # every factor's Adam state
        for key, state in optimizer["state"].items():
            assert all(t.numel() for t in state.values() if torch.is_tensor(t) and t.dim())
            if two["strategy"] == "fsdp":  # gathered whole from the shards, keyed by parameter name
                assert state["exp_avg"].shape == tensors[key].shape, key


def test_zero3_saves_full_adapter_tensors(two, tiny_model_dir):
    if two["strategy"] != "zero3":
        pytest.skip("zero3 only: its parameters are partitioned to empty tensors on each process")
    from abba_cli.adapters import adapter_state_dict, inject_adapters
    from abba_cli.config import AdapterConfig
    from abba_cli.models.loading import load_base

    model, _ = load_base(str(tiny_model_dir))
    inject_adapters(model, AdapterConfig(r1=2, r2=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    expected = {k: v.shape for k, v in adapter_state_dict(model).items()}
    for run in (two["abba"], two["stopped"]):
        saved = load_file(run / "adapter_model.safetensors")
        assert {k: v.shape for k, v in saved.items()} == expected
        assert all(
            bool(torch.isfinite(v).all()) and float(v.abs().max()) > 0 for k, v in saved.items() if ".A" in k
        )
