"""`abba train` against hostile situations: each is one `error:` line (exit 2) or a warning, and
nothing already on disk is lost."""

from __future__ import annotations

import errno
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    cli,
    cli_error_line,
    gsm8k_rows,
    replace_training_loss,
    request_stop,
    train_cli,
    train_config,
)
from safetensors.torch import load_file, save_file

from abba_cli.models import loading as models
from abba_cli.run.layout import last_finite_checkpoint
from abba_cli.train import checkpoint as ckpt_mod
from abba_cli.train.loss import target_loss_sum

_error_line = cli_error_line


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _no_model_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the problem was reported")

    monkeypatch.setattr(models, "load_configured_base", refuse)


# ----------------------------------------------------------------------------------------------- lock


def _hold_lock(run: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock, as a running `abba train` does."""
    code = f"from pathlib import Path; from abba_cli.run.training_dir import RunLock\nwith RunLock(Path({str(run)!r})):\n print('locked', flush=True); input()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_train_on_a_run_dir_in_use_fails_at_once(tmp_path, tiny_model_dir, monkeypatch):
    cfg = train_config(tmp_path, tiny_model_dir, save_every=1)
    assert train_cli(cfg).exit_code == 0
    run = tmp_path / "run"
    assert not [p.name for p in run.rglob(".*")]  # the lock is gone once the run ends
    before = _snapshot(run)
    holder = _hold_lock(run)
    try:
        _no_model_load(monkeypatch)
        for args in ((), ("--resume",)):
            result = train_cli(cfg, *args)
            assert result.exit_code == 2
            line = _error_line(result)
            assert f"{run} is in use by another abba train (pid {holder.pid})" in line
    finally:
        holder.communicate("\n", timeout=30)
    after = _snapshot(run)
    assert after == before  # metrics, config, checkpoints untouched


def test_a_fresh_run_dir_in_use_is_refused_and_a_failed_start_leaves_no_directory(tmp_path, tiny_model_dir):
    run = tmp_path / "new"
    holder = _hold_lock(run)
    try:
        result = train_cli(train_config(tmp_path, tiny_model_dir, "new"))
        assert result.exit_code == 2 and "in use by another abba train" in _error_line(result)
    finally:
        holder.communicate("\n", timeout=30)
    assert not run.exists()  # the holder created it and, having written nothing, removed it
    # A run that fails after taking the lock (here: a bad target list) leaves no directory either, so a retry
    # is not refused with "already exists".
    bad = train_cli(train_config(tmp_path, tiny_model_dir, "bad"), "--set", "adapter.target_modules=[nope]")
    assert bad.exit_code == 2 and not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------- output_dir


@pytest.mark.parametrize("case", ["under-a-file", "a-file", "dangling-symlink"])
def test_unusable_output_dir_is_one_line_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch, case):
    blocker = tmp_path / "blocker"
    if case == "under-a-file":
        blocker.write_text("x")
        out, want = blocker / "run", "is a file, not a directory"
    elif case == "a-file":
        blocker.write_text("x")
        out, want = blocker, "is a file, not a directory"
    else:
        blocker.symlink_to(tmp_path / "gone")
        out, want = blocker, "dangling symlink"
    _no_model_load(monkeypatch)
    result = train_cli(train_config(tmp_path, tiny_model_dir, str(out)))
    assert result.exit_code == 2 and want in _error_line(result) and str(out) in _error_line(result)
    assert blocker.is_symlink() or blocker.read_text() == "x"


def test_read_only_output_dir_is_one_line_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    """A read-only mount, simulated (tests run as root, which ignores permission bits): mkdir raises EROFS."""
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == tmp_path / "ro" / "run":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    _no_model_load(monkeypatch)
    (tmp_path / "ro").mkdir()
    result = train_cli(train_config(tmp_path, tiny_model_dir, str(tmp_path / "ro" / "run")))
    assert result.exit_code == 2 and "read-only file system" in _error_line(result)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
def test_output_dir_without_write_permission(tmp_path, tiny_model_dir, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o500)
    _no_model_load(monkeypatch)
    result = train_cli(train_config(tmp_path, tiny_model_dir, str(parent / "run")))
    assert result.exit_code == 2 and "no permission to write" in _error_line(result)


def test_output_dir_tilde_is_the_home_directory(tmp_path, tiny_model_dir, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    result = train_cli(train_config(tmp_path, tiny_model_dir, "~/runs/x"))
    assert result.exit_code == 0, result.output
    assert (home / "runs" / "x" / "adapter_model.safetensors").is_file()
    assert not (cwd / "~").exists()


# ----------------------------------------------------------------------------------------------- resume


def test_resume_drops_a_half_written_metrics_line(tmp_path, tiny_model_dir):
    cfg = train_config(tmp_path, tiny_model_dir, save_every=1, max_steps=3)
    assert train_cli(cfg).exit_code == 0
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    # As a kill -9 during the write of step 3's line leaves it, with the step-2 checkpoint the latest.
    (run / "checkpoints" / "step-3").rename(run / "checkpoints" / "gone")
    metrics.write_text("".join(lines[:2]) + lines[2][:15])
    result = train_cli(cfg, "--resume")
    assert result.exit_code == 0, result.output
    assert "dropped a half-written last line" in result.stderr
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3]


def test_resume_with_a_corrupt_metrics_line_names_it(tmp_path, tiny_model_dir):
    cfg = train_config(tmp_path, tiny_model_dir, save_every=1)
    assert train_cli(cfg).exit_code == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("{broken\n" + "".join(lines[1:]))
    before = metrics.read_bytes()
    result = train_cli(cfg, "--resume")
    assert result.exit_code == 2 and f"{metrics}, line 1: not a JSON record" in _error_line(result)
    assert metrics.read_bytes() == before


def test_resume_with_a_broken_run_config_names_the_file(tmp_path, tiny_model_dir, monkeypatch):
    cfg = train_config(tmp_path, tiny_model_dir, save_every=1)
    assert train_cli(cfg).exit_code == 0
    saved = tmp_path / "run" / "config.yaml"
    saved.write_text(saved.read_text() + "train: [unclosed\n")
    _no_model_load(monkeypatch)
    result = train_cli(cfg, "--resume")
    assert result.exit_code == 2
    line = _error_line(result)
    assert f"{saved}: YAML syntax error (line" in line


def test_resume_after_the_training_data_changed_is_refused(tmp_path, tiny_model_dir):
    cfg = train_config(tmp_path, tiny_model_dir, save_every=1, max_steps=3)
    assert train_cli(cfg).exit_code == 0
    run = tmp_path / "run"
    (run / "checkpoints" / "step-3").rename(run / "checkpoints" / "gone")  # resumable from step 2
    assert train_cli(cfg, "--resume").exit_code == 0  # the same data resumes
    (run / "checkpoints" / "step-3").rename(run / "checkpoints" / "gone3")
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps(r) + "\n" for r in gsm8k_rows(8, answer_offset=1))
    )  # same rows, new answers
    before = _snapshot(run)
    result = train_cli(cfg, "--resume")
    assert result.exit_code == 2
    line = _error_line(result)
    assert f"the training examples of data.path {data} changed" in line
    assert _snapshot(run) == before


# ----------------------------------------------------------------------------------------------- extend


def test_extend_a_finished_run_to_more_steps(tmp_path, tiny_model_dir):
    cfg = train_config(tmp_path, tiny_model_dir, save_every=1, scheduler="linear")
    assert train_cli(cfg).exit_code == 0
    run = tmp_path / "run"
    first = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    result = train_cli(cfg, "--resume", "--set", "train.max_steps=4")
    assert result.exit_code == 0, result.output
    assert "extending the run from 2 to 4 steps" in result.stderr
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[:2] == first  # the first two steps are kept as they were
    # The schedule recomputed for 4 steps (linear, no warmup): step k trains at lr * (4 - (k - 1)) / 4.
    assert [r["lr"] for r in records[2:]] == pytest.approx([1e-2 * 2 / 4, 1e-2 * 1 / 4], rel=1e-9)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 4
    assert train_cli(cfg, "--resume", "--set", "train.max_steps=4").exit_code == 0  # the new config resumes


def test_extend_refuses_to_shorten_or_to_start_without_a_checkpoint(tmp_path, tiny_model_dir):
    cfg = train_config(tmp_path, tiny_model_dir, save_every=1)
    assert train_cli(cfg).exit_code == 0
    result = train_cli(cfg, "--resume", "--set", "train.max_steps=1")
    assert result.exit_code == 2 and "not shortened" in _error_line(result)
    plain = train_config(tmp_path, tiny_model_dir, "plain")  # no save_every: no checkpoint to continue from
    assert train_cli(plain).exit_code == 0
    result = train_cli(plain, "--resume", "--set", "train.max_steps=4")
    assert result.exit_code == 2 and "has none (train.save_every was not set)" in _error_line(result)
    result = train_cli(cfg, "--resume", "--set", "train.max_steps=4", "--set", "train.lr=0.5")
    assert result.exit_code == 2 and "train.max_steps, train.lr" in _error_line(result)


# ----------------------------------------------------------------------------------------------- stops


def test_nan_names_a_finite_checkpoint_written_before_it(tmp_path, tiny_model_dir, monkeypatch):
    """The newest checkpoint may hold the overflow that caused the divergence: it is not the one to name."""
    real, calls = target_loss_sum, {"n": 0}
    run = tmp_path / "my run"  # a space: the resume hint must be shell-quoted

    def nan_at_third(logits, labels):
        calls["n"] += 1
        if calls["n"] == 3:
            # step-2 (written after step 2) holds a non-finite factor, as an overflow would leave it
            path = run / "checkpoints" / "step-2" / "adapter_model.safetensors"
            tensors = load_file(path)
            key = next(iter(tensors))
            tensors[key] = torch.full_like(tensors[key], float("inf"))
            save_file(tensors, path)
            return real(logits, labels) * float("nan")
        return real(logits, labels)

    replace_training_loss(monkeypatch, nan_at_third)
    result = train_cli(
        train_config(tmp_path, tiny_model_dir, str(run), max_steps=4, save_every=1, micro_batch_size=4)
    )
    assert result.exit_code == 2
    line = _error_line(result)
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step-1'} " in line
    hint = line.split("resume from it: ")[1].split(")")[0]
    assert shlex.split(hint) == ["abba", "train", str(run / "config.yaml"), "--resume"]


def test_last_finite_checkpoint_skips_non_finite_optimizer_state(tmp_path):
    state = ckpt_mod.TrainState(1, 0, 1, 1, 0.0, 10)
    for step, moment in ((1, 1.0), (2, float("nan")), (3, 1.0)):
        state.step = step
        opt = {
            "state": {0: {"exp_avg": torch.tensor([moment]), "step": torch.tensor(1.0)}},
            "param_groups": [],
        }
        ckpt_mod.save_checkpoint(tmp_path, state, {"w": torch.ones(2)}, opt, {}, [{}], keep=None)
    assert last_finite_checkpoint(tmp_path, before_step=4).name == "step-3"
    assert last_finite_checkpoint(tmp_path, before_step=3).name == "step-1"  # step-2 is not finite
    assert last_finite_checkpoint(tmp_path, before_step=1) is None


def test_stop_signal_hint_is_shell_quoted(tmp_path, tiny_model_dir, monkeypatch):
    run = tmp_path / "a run's dir"
    request_stop(monkeypatch)
    result = train_cli(train_config(tmp_path, tiny_model_dir, str(run), max_steps=3))
    assert result.exit_code == 143  # SIGTERM's convention when no signal number was caught
    hint = result.stderr.split("resume with: ")[1].splitlines()[0]
    assert shlex.split(hint) == ["abba", "train", str(run / "config.yaml"), "--resume"]


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_model_dir, monkeypatch):
    real, calls = ckpt_mod.atomic_save_safetensors, {"n": 0}

    def disk_full_on_second(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "atomic_save_safetensors", disk_full_on_second)
    result = train_cli(train_config(tmp_path, tiny_model_dir, max_steps=3, save_every=1))
    assert result.exit_code == 2
    line = _error_line(result)
    ckpts = tmp_path / "run" / "checkpoints"
    assert f"no space left on device writing checkpoint {ckpts / 'step-2'}" in line
    assert f"the last checkpoint {ckpts / 'step-1'} is intact" in line
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-1"]  # no half-written step-2 left behind
    state, tensors, *_ = ckpt_mod.load_checkpoint(ckpts / "step-1")  # and step-1 still loads
    assert state.step == 1 and tensors


def test_read_only_abba_home_warns_and_the_run_succeeds(tmp_path, tiny_model_dir, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("ABBA_HOME", str(blocker / "home"))  # cannot be created, even by root
    result = train_cli(train_config(tmp_path, tiny_model_dir))
    assert result.exit_code == 0, result.output
    assert "warning: could not record the latest run" in result.stderr
    assert f"--run {tmp_path / 'run'}" in result.stderr
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_lock_is_released_when_a_run_is_stopped(tmp_path, tiny_model_dir, monkeypatch):
    run = tmp_path / "run"
    request_stop(monkeypatch)
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=3)
    assert train_cli(cfg).exit_code == 143
    monkeypatch.undo()
    result = train_cli(cfg, "--resume")  # not refused as "in use"
    assert result.exit_code == 0, result.output
    assert not (run / ".lock").exists()


# ----------------------------------------------------------------------------------------------- disk, NaN checkpoints, signals


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_full_disk_while_the_optimizer_state_is_written_is_one_line(tmp_path, tiny_model_dir, monkeypatch):
    """A real full device under torch.save: given a path, torch's C++ writer fails with "RuntimeError:
    [enforce fail at inline_container.cc] unexpected pos", a traceback no handler recognised; through a Python
    file it is ENOSPC. The fake sends the second checkpoint's optimizer.pt to /dev/full in whichever form
    torch.save was called, so it fails exactly as a full disk would."""
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        if str(getattr(f, "name", f)).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                if isinstance(f, (str, os.PathLike)):
                    return real_save(obj, "/dev/full", *args, **kwargs)
                with open("/dev/full", "wb") as full:
                    return real_save(obj, full, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=3, save_every=1)
    result = train_cli(cfg)
    assert result.exit_code == 2, result.output
    line = _error_line(result)
    ckpts = tmp_path / "run" / "checkpoints"
    assert f"no space left on device writing checkpoint {ckpts / 'step-2'}" in line
    assert f"the last checkpoint {ckpts / 'step-1'} is intact" in line
    monkeypatch.undo()  # space freed: the run resumes from step-1
    resumed = train_cli(cfg, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.stderr and "step-1" in resumed.stderr


def test_resume_from_a_non_finite_checkpoint_names_it_before_any_step(tmp_path, tiny_model_dir, monkeypatch):
    run = tmp_path / "run"
    cfg = train_config(tmp_path, tiny_model_dir, max_steps=3, save_every=1, save_total_limit=3)
    assert train_cli(cfg).exit_code == 0
    bad = run / "checkpoints" / "step-3" / "adapter_model.safetensors"
    tensors = load_file(bad)
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, bad)
    metrics = (run / "metrics.jsonl").read_text()

    def no_step(logits, labels):
        raise AssertionError("a step ran before the bad checkpoint was named")

    replace_training_loss(monkeypatch, no_step)
    result = train_cli(
        cfg, "--set", "train.max_steps=5", "--resume"
    )  # extend the run from its last checkpoint
    assert result.exit_code == 2, result.output
    line = _error_line(result)
    assert f"--resume: {bad} holds non-finite (inf/nan) values in 1 tensor(s), e.g. {key}" in line
    assert f"the last finite checkpoint is {run / 'checkpoints' / 'step-2'}" in line
    assert (run / "metrics.jsonl").read_text() == metrics


def test_ctrl_c_while_the_base_loads_stops_even_when_sigint_was_ignored(tmp_path, tiny_model_dir):
    """A shell without job control starts background commands with SIGINT ignored; Python then raises no
    KeyboardInterrupt, and a Ctrl-C (kill -INT) while the model loaded used to be lost: the run trained to
    the end and exited 0."""
    import signal

    worker = Path(__file__).resolve().parents[1] / "train" / "abba_worker.py"
    env = dict(os.environ, ABBA_TEST_SIGINT_IN_LOAD="1", ABBA_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(worker), "train", str(train_config(tmp_path, tiny_model_dir))],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not a single step


def test_eval_of_a_non_finite_adapter_names_the_run_file(tmp_path, tiny_model_dir):
    from helpers import make_run

    run = make_run(tmp_path / "run", tiny_model_dir)
    weights = run / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[1]
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    save_file(tensors, weights)
    result = cli("eval", "-t", "gsm8k", "--run", run, "--model", tiny_model_dir, "--limit", "1")
    assert result.exit_code == 2, result.output
    line = _error_line(result)
    assert f"{weights}: {key} holds NaN or infinite values" in line
