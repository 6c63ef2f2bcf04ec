"""`abba export --format peft-lora --rank K`: the best rank-K approximation per layer, with its error reported."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import cli, make_run
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from abba_cli.ship.export import export_run
from abba_cli.ship.truncate import svd_truncate

TARGETS = ["q_proj", "v_proj", "down_proj"]
PEFT = "base_model.model.{}.lora_{}.weight"


def tail_error(dw: torch.Tensor, k: int) -> float:
    """Eckart-Young: the relative Frobenius error of the best rank-k approximation, from the full float64 SVD."""
    sigma = torch.linalg.svdvals(dw.double())
    return math.sqrt(float((sigma[k:] ** 2).sum()) / float((sigma**2).sum()))


@pytest.mark.parametrize(("m", "n", "r", "k"), [(40, 30, 12, 5), (9, 50, 12, 4), (20, 20, 3, 7)])
def test_svd_truncate_is_the_svd_tail(m, n, r, k):
    g = torch.Generator().manual_seed(1)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    A = (
        torch.randn(r, n, generator=g, dtype=torch.float64)
        * torch.logspace(0, -3, r, dtype=torch.float64)[:, None]
    )
    t = svd_truncate(B, A, k)
    dw = B @ A
    assert t.B.shape == (m, k) and t.A.shape == (k, n)
    assert t.rel_error == pytest.approx(tail_error(dw, k), rel=1e-9, abs=1e-12)
    actual = float(torch.linalg.norm(dw - t.B @ t.A) / torch.linalg.norm(dw))
    assert actual == pytest.approx(t.rel_error, rel=1e-7, abs=1e-12)
    assert t.kept == min(k, m, n, r)  # (20, 20, 3, 7): rank 3, padded with zeros to 7 and exact
    if t.kept < k:
        assert t.rel_error < 1e-12 and bool((t.B[:, t.kept :] == 0).all())


def test_rank_k_export_error_and_logits(tiny_model_dir, tmp_path, capsys):
    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=2, r2=3, target_modules=TARGETS)
    out = tmp_path / "k3"
    export_run(format="peft-lora", out=out, run=run, rank=3)
    printed = capsys.readouterr().out
    assert "from rank 6 to 3" in printed and "max" in printed and "mean" in printed
    assert "logit change on 3 prompts" in printed and "adapter's own effect" in printed
    cfg = json.loads((out / "adapter_config.json").read_text())
    report = json.loads((out / "abba_export.json").read_text())
    assert cfg["r"] == 3 and report["rank"] == 3 and report["exact_rank"] == 6

    ours = load_file(run / "adapter_model.safetensors")
    theirs = load_file(out / "adapter_model.safetensors")
    s = json.loads((run / "adapter_config.json").read_text())["scaling"]
    errors = []
    for module, reported in report["rel_frobenius_error"].items():
        f = {k: ours[f"{module}.{k}"].double() for k in ("B1", "A1", "B2", "A2")}
        dw = s * (f["B1"] @ f["A1"]) * (f["B2"] @ f["A2"])
        want = tail_error(dw, 3)
        assert reported == pytest.approx(want, rel=1e-6)
        # What PEFT will apply: lora_alpha / r · B A from the fp32 file.
        got = (
            cfg["lora_alpha"]
            / cfg["r"]
            * (theirs[PEFT.format(module, "B")].double() @ theirs[PEFT.format(module, "A")].double())
        )
        assert float(torch.linalg.norm(dw - got) / torch.linalg.norm(dw)) == pytest.approx(want, rel=1e-4)
        errors.append(want)
    assert report["rel_frobenius_error_max"] == pytest.approx(max(errors), rel=1e-6) and max(errors) > 0.01
    assert report["rel_frobenius_error_mean"] == pytest.approx(sum(errors) / len(errors), rel=1e-6)
    logits = report["logits"]
    assert logits["max_abs_change"] > 0 and logits["adapter_effect"] > logits["max_abs_change"] / 10
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)  # loads at r = 3


@pytest.mark.parametrize("k", [6, 100])
def test_rank_at_or_above_the_exact_rank_is_the_exact_export(tiny_model_dir, tmp_path, capsys, k):
    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=2, r2=3)
    export_run(format="peft-lora", out=tmp_path / "exact", run=run)
    capsys.readouterr()
    export_run(format="peft-lora", out=tmp_path / "k", run=run, rank=k)
    assert f"--rank {k} >= the adapter's exact rank 6: exporting it exactly" in capsys.readouterr().out
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "k" / name).read_bytes() == (tmp_path / "exact" / name).read_bytes()
    assert not (tmp_path / "k" / "abba_export.json").exists()


def test_lora_run_truncates_too(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, type="lora", r=4, target_modules=["q_proj"])
    export_run(format="peft-lora", out=tmp_path / "k2", run=run, rank=2)
    report = json.loads((tmp_path / "k2" / "abba_export.json").read_text())
    t = load_file(run / "adapter_model.safetensors")
    module = "model.layers.0.self_attn.q_proj"
    assert report["rel_frobenius_error"][module] == pytest.approx(
        tail_error(t[f"{module}.B"].double() @ t[f"{module}.A"].double(), 2), rel=1e-6
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "0"], "--rank"),
        (["--rank", "-3"], "--rank"),
        (["--rank", "two"], "--rank"),
        (["--rank", "2", "--format", "peft-loha"], "--rank applies to --format peft-lora only"),
    ],
)
def test_bad_rank_is_one_line(tiny_model_dir, tmp_path, args, message):
    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=2, r2=2)
    result = cli(*["export", "--out", str(tmp_path / "o"), "--run", str(run), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_hira_rank_export_is_refused(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, type="hira", r=4)
    result = cli(*["export", "--out", str(tmp_path / "o"), "--run", str(run), "--rank", "2"])
    assert result.exit_code == 2 and "not low-rank" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_rank_must_be_a_positive_int_in_the_api(tiny_model_dir, tmp_path):
    from abba_cli.errors import UserError

    run = make_run(tmp_path / "run", tiny_model_dir, type="abba", r1=2, r2=2)
    for bad in (0, 2.5, True):
        with pytest.raises(UserError, match="positive integer"):
            export_run(format="peft-lora", out=tmp_path / "o", run=run, rank=bad)
