"""scripts/gpu_check.sh --smoke: the one device call's every stage runs on the CPU at tiny sizes and delivers
what the GPU run will (at most 8 files: a summary, the log and an archive), so device time is never spent on a
script that has not run. Timings are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import subprocess_env

from abba_cli.adapters import cost

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("none", "lora", "peft_lora", "abba", "abba_merged", "abba_khatri_rao", "abba_hybrid")

pytestmark = pytest.mark.slow  # trains and compiles a tiny model a few times


@pytest.fixture(scope="module")
def smoke(tiny_model_dir, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("gpu_check")
    text = tmp / "rows.jsonl"
    text.write_text(
        "".join(json.dumps({"text": f"Question {i}: " + "how many clips? " * 12}) + "\n" for i in range(8))
    )
    env = subprocess_env(
        tmp, PY=sys.executable, PYTHONPATH=str(ROOT), TOKENIZER=str(tiny_model_dir), TRAIN_TEXT=str(text),
        RES=str(tmp / "res"), OUT=str(tmp / "out"),
    )  # fmt: skip
    (tmp / "out").mkdir()
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke"], env=env, capture_output=True,
                       text=True, timeout=1500)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    res = tmp / "res"
    # --smoke runs the measurement stages in one process (gpu_check.json); the GPU run writes one file per stage
    check = json.loads((res / "gpu_check.json").read_text())
    return {"out": tmp / "out", "log": (res / "log.txt").read_text(), "stdout": p.stdout,
            **{n: check for n in ("bf16_error", "step_1x512", "step_8x512", "step_packed_1x4096", "loss_impls",
                                  "layers", "decode")},
            "commands": json.loads((res / "commands.json").read_text())}  # fmt: skip


def _result(data: dict, stage: str):
    s = data["stages"][stage]
    assert "error" not in s, s.get("trace")
    return s["result"]


def test_delivers_a_summary_the_log_and_an_archive(smoke):
    files = sorted(p.name for p in smoke["out"].iterdir())
    assert files == ["gpu_check.tar.gz", "log.txt", "summary.md"]
    summary = (smoke["out"] / "summary.md").read_text()
    for stage in (
        "bf16_error",
        "step_1x512",
        "step_8x512",
        "step_packed_1x4096",
        "layers",
        "decode",
        "commands",
    ):
        assert f"## {stage}" in summary
    assert "failed" not in summary and "not run" not in summary and "did not finish" not in summary, summary
    with tarfile.open(smoke["out"] / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("commands.json") for n in names) and not any(
        n.endswith(".safetensors") for n in names
    )
    assert smoke["log"].count(": exit 0 after") == 2, smoke["log"][-3000:]  # the stages, the commands


def test_bf16_error_and_step_stages(smoke):
    errs = _result(smoke["bf16_error"], "bf16_error")
    assert {(r["m"], r["path"]) for r in errs} == {(m, p) for m in (64, 160) for p in ("lora", *cost.PATHS)}
    for r in errs:  # bf16 against float64: a few bf16 ulps, far from a wrong gradient
        assert set(r["rel_err"]) >= {"y", "dx"} and max(r["rel_err"].values()) < 0.05, r
    for stage in ("step_1x512", "step_8x512"):
        rows = _result(smoke[stage], stage)
        assert {(r["variant"], r["compiled"]) for r in rows} == {(v, False) for v in VARIANTS} | {
            ("abba", True)
        }
        assert all(r["ms_per_micro_batch"] > 0 and r["gpu_busy"] is None for r in rows)  # no busy on the CPU


def test_packed_step_stage(smoke):
    rows = _result(smoke["step_packed_1x4096"], "step_packed_1x4096")
    assert [r["variant"] for r in rows] == ["peft_lora", "lora", "abba"]
    for r in rows:  # several examples share each 64-token row, isolated by the sdpa backend's packed mask
        assert r["tokens_per_row"] == 64 and r["examples_per_row"] > 2 and r["attn_implementation"] == "sdpa"
        assert r["ms_per_micro_batch"] > 0 and not r["compiled"]


def test_loss_impls_stage(smoke):
    rows = {r["impl"]: r for r in _result(smoke["loss_impls"], "loss_impls")}
    assert list(rows) == ["full", "chunked", "cce", "liger"]
    for impl in ("cce", "liger"):  # no CUDA here: the row says so instead of failing the stage
        assert rows[impl]["skipped"].startswith("needs a CUDA GPU"), rows[impl]
    assert rows["chunked"]["ms"] > 0 and rows["chunked"]["peak_bytes"] >= 0
    full = rows["full"]  # bf16 autocast both ways: a few bf16 ulps apart, nowhere near a wrong gradient
    assert max(full["loss_rel_err"], full["d_hidden_rel_err"], full["d_weight_rel_err"]) < 2e-2, full
    assert full["ms"] > 0 and full["tokens"] == 64


def test_layer_sweep_and_decode(smoke):
    layers = _result(smoke["layers"], "layers")
    assert len(layers["cells"]) == 4 and layers["fit"]["cells"] == 4
    for cell in layers["cells"]:  # the launches recorded are those the cost model prices
        assert {k: v for k, v in cell["launches"].items() if k != "lora"} == cost.path_launches(4, 4)
    decode = _result(smoke["decode"], "decode")
    assert [r["batch"] for r in decode] == [2, 4]
    assert all(r["prefill_s"] > 0 and r["math_upper_min"] > r["gsm8k_upper_min"] > 0 for r in decode)


def test_the_real_commands_ran(smoke):
    cmds = smoke["commands"]["commands"]
    assert list(cmds) == [
        "train_1x64_ckpt",
        "train_2x64",
        "train_1x256_packed",
        "merge",
        "eval_gsm8k_device_default",
        "eval_gsm8k_bs8",
    ]
    assert all(c["exit"] == 0 for c in cmds.values()), {k: c.get("error") for k, c in cmds.items()}
    assert all(c["figures"]["steps"] == 2 for k, c in cmds.items() if k.startswith("train"))
    bs8, default = cmds["eval_gsm8k_bs8"]["figures"], cmds["eval_gsm8k_device_default"]["figures"]
    assert (bs8["n"], bs8["batch_size"], default["batch_size"], default["processes"]) == (4, 8, 8, 1)
