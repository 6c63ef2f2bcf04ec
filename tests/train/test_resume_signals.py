"""Exact resume under real interruptions: SIGINT, SIGTERM and kill -9 sent to `python -m abba_cli train`.

Every interrupted run is resumed with `--resume` and must end with the same adapter, bit for bit, as one
uninterrupted run with the same seed (CPU, one thread, so the kernels are deterministic). The data has 10
examples in micro-batches of 2 (5 per epoch) with 2 micro-batches per optimizer step, so steps straddle epoch
boundaries and every checkpoint after an odd number of steps sits mid-epoch; dropout is on, so the RNG state
must be restored too. Signals are sent only once the run has visibly progressed (a checkpoint directory or a
metrics line exists); nothing in the training loop knows it is being tested.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import subprocess_env, tiny_config
from safetensors.torch import load_file

# Every test here runs `abba train` in subprocesses (about a minute in all): `make test-fast` skips them.
pytestmark = pytest.mark.slow

MAX_STEPS = 12
SAVE_EVERY = 2
# A hung run fails the test after this long instead of eating CI's time (a run takes ~10 s; 2 busy cores: ~45 s).
DEADLINE_S = 240


def _env(tmp_path: Path) -> dict[str, str]:
    return subprocess_env(tmp_path, PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """One dataset file for every run of this module: a resumed run must name the same data.path."""
    rows = [
        {
            "question": f"Natalia sold {i} clips in April and {2 * i} in May. How many?",
            "answer": f"#### {3 * i}",
        }
        for i in range(10)
    ]
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path: Path, model_dir: Path, data: Path, out: str) -> Path:
    train = {"max_steps": MAX_STEPS, "grad_accum_steps": 2, "save_every": SAVE_EVERY, "save_total_limit": 2}
    return tiny_config(
        tmp_path, model_dir, out, adapter={"dropout": 0.1}, data={"path": str(data)}, train=train
    )


def _cmd(cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "abba_cli", "train", str(cfg), *args]


def _train(tmp_path: Path, cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(cfg, *args), env=_env(tmp_path), capture_output=True, text=True, timeout=DEADLINE_S
    )


def _start(tmp_path: Path, cfg: Path) -> subprocess.Popen:
    return subprocess.Popen(
        _cmd(cfg), env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_until(proc: subprocess.Popen, ready: Callable[[], bool]) -> None:
    """Poll until `ready()`; fail if the run ends first (it must still be training when signalled) or if
    DEADLINE_S pass (a hang), killing the run then."""
    deadline = time.monotonic() + DEADLINE_S
    while not ready():
        assert proc.poll() is None, f"training ended before it could be interrupted:\n{proc.stderr.read()}"
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no progress within {DEADLINE_S} s:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.02)


def _metrics_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _checkpoints(run: Path) -> list[str]:
    root = run / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _assert_same_adapter(run: Path, reference: Path) -> None:
    got = load_file(run / "adapter_model.safetensors")
    want = load_file(reference / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype
        assert got[key].equal(want[key]), f"{key} differs after resume"


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory, data) -> Path:
    """One uninterrupted run: the adapter every interrupted-and-resumed run must reproduce exactly."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = _train(tmp, _config(tmp, tiny_model_dir, data, "run"))
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


def test_reference_run_keeps_save_total_limit_checkpoints(reference):
    # save_total_limit bounds disk: 6 checkpoints were written, the 2 newest remain.
    assert _checkpoints(reference) == [f"step-{MAX_STEPS - SAVE_EVERY}", f"step-{MAX_STEPS}"]
    assert _metrics_steps(reference) == list(range(1, MAX_STEPS + 1))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_saves_and_resume_is_exact(tmp_path, tiny_model_dir, data, reference, sig):
    cfg = _config(tmp_path, tiny_model_dir, data, "run")
    run = tmp_path / "run"
    proc = _start(tmp_path, cfg)
    # After the first checkpoint (step 2, four micro-batches into the 5-micro-batch epoch), mid-run.
    _wait_until(proc, lambda: (run / "checkpoints" / "step-2").is_dir())
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=DEADLINE_S)

    assert proc.returncode == 128 + sig, (proc.returncode, err)
    steps = _metrics_steps(run)
    assert 2 <= steps[-1] < MAX_STEPS  # it stopped early ...
    assert f"step-{steps[-1]}" in _checkpoints(run)  # ... after finishing a step and saving it
    assert signal.Signals(sig).name in err
    assert f"abba train {run / 'config.yaml'} --resume" in err  # how to resume, copy-pasteable
    assert "Traceback" not in err
    assert not (run / "adapter_model.safetensors").exists()  # an interrupted run is not a finished one

    resumed = _train(tmp_path, cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run / 'checkpoints' / f'step-{steps[-1]}'}" in resumed.stderr
    _assert_same_adapter(run, reference)
    assert _losses(run) == _losses(reference)  # the same steps on the same data, logged once each


def test_kill_9_between_checkpoints_resumes_from_the_last_complete_one(
    tmp_path, tiny_model_dir, data, reference
):
    cfg = _config(tmp_path, tiny_model_dir, data, "run")
    run = tmp_path / "run"
    proc = _start(tmp_path, cfg)
    # Step 3 is logged: the step-2 checkpoint is complete and step 4's is not due yet.
    _wait_until(proc, lambda: 3 in _metrics_steps(run))
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _metrics_steps(run)[-1]
    assert killed_at < MAX_STEPS
    # The newest step-N directory on disk (renamed into place only when whole); a kill inside step N's save
    # leaves step N - SAVE_EVERY as the newest, never an older one.
    on_disk = [int(name.removeprefix("step-")) for name in _checkpoints(run) if name.startswith("step-")]
    last_complete = max(on_disk)
    assert killed_at - SAVE_EVERY <= last_complete <= killed_at and last_complete % SAVE_EVERY == 0

    resumed = _train(tmp_path, cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    # Starting again from step 0 would reproduce the reference too: check which checkpoint was used.
    assert (
        f"resuming from {run / 'checkpoints' / f'step-{last_complete}'} (step {last_complete}/"
        in resumed.stderr
    )
    _assert_same_adapter(run, reference)
    # metrics past the checkpoint were dropped and re-run, not duplicated
    assert _losses(run) == _losses(reference)


def test_partial_checkpoint_left_by_a_crash_is_ignored(tmp_path, tiny_model_dir, data, reference):
    """A crash during a checkpoint write leaves a temporary `.step-N.*.partial` dir (atomic_directory) and, at
    worst, a `step-N` without its final state.json; resume must use the last complete checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    cfg = _config(tmp_path, tiny_model_dir, data, "run")
    # The run was moved here: its resolved config names the new directory (the only difference allowed).
    saved = run / "config.yaml"
    saved.write_text(saved.read_text().replace(str(reference), str(run)))
    last_good = f"step-{MAX_STEPS - SAVE_EVERY}"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints" / f"step-{MAX_STEPS}")
    # What a kill -9 inside save_checkpoint leaves: a half-written temporary directory ...
    partial = run / "checkpoints" / f".step-{MAX_STEPS}.x1y2.partial"
    partial.mkdir()
    weights = (reference / "checkpoints" / f"step-{MAX_STEPS}" / "adapter_model.safetensors").read_bytes()
    (partial / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 3])
    (partial / "optimizer.pt").write_bytes(b"PK\x03\x04truncated")
    # ... and, as if written by something less careful, a final-named directory without state.json.
    torn = run / "checkpoints" / f"step-{MAX_STEPS}"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(weights[:100])

    resumed = _train(tmp_path, cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run / 'checkpoints' / last_good}" in resumed.stderr
    _assert_same_adapter(run, reference)
    assert not partial.exists()  # the next checkpoint write cleared the stale temporary dir


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, data):
    cfg = _config(tmp_path, tiny_model_dir, data, "run")
    run = tmp_path / "run"
    # On q/v only, the blown-up activations saturate RMSNorm into a constant, finite loss; adapting all seven
    # projections makes lr=1e30 diverge to NaN within a few steps.
    proc = _train(
        tmp_path,
        cfg,
        "--set",
        "train.lr=1e30",
        "--set",
        "train.save_every=1",
        "--set",
        "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
    )

    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "non-finite loss" in lines[0] and "Traceback" not in proc.stderr
    step = int(lines[0].split(" at step ")[1].split(";")[0])
    assert step >= 2
    assert not (run / "adapter_model.safetensors").exists()  # no final adapter from a diverged run
    # Every checkpoint left behind holds finite weights, and the one the message names exists.
    import torch

    ckpts = [run / "checkpoints" / name for name in _checkpoints(run)]
    assert ckpts, "the last good checkpoint was not kept"
    named = lines[0].split("the last good checkpoint is ")[1].split(" ")[0]
    assert Path(named) in ckpts
    for ckpt in ckpts:
        tensors = load_file(ckpt / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values()), f"{ckpt} holds non-finite weights"
