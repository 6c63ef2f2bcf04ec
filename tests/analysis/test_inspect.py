"""`abba inspect`: singular values of dW from the saved factors, checked against numpy's SVD of the explicit
dW in float64; the effective-rank and energy-rank formulas on hand-made spectra; every run type; the outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import make_run
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from abba_cli.adapters.factors import factored_singular_values
from abba_cli.analysis.spectra import effective_rank, energy_rank, inspect_run, numerical_floor
from abba_cli.cli import app


def _reference(dw: np.ndarray) -> np.ndarray:
    sv = np.linalg.svd(dw, compute_uv=False)
    return sv[sv > numerical_floor(sv, dw.shape)]


def _w0(model_dir: Path) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_file(model_dir / "model.safetensors").items()}


def _explicit_dw(run: Path, w0: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """dW of every adapted layer written out in float64 from the stored factors, by the formulas in io.py."""
    cfg = json.loads((run / "adapter_config.json").read_text())
    t = {k: v.double().numpy() for k, v in load_file(run / "adapter_model.safetensors").items()}
    s, out = cfg["scaling"], {}
    for module in {k.rpartition(".")[0] for k in t}:
        f = {k.rpartition(".")[2]: v for k, v in t.items() if k.startswith(module + ".")}
        if cfg["type"] == "abba":
            out[module] = s * (f["B1"] @ f["A1"]) * (f["B2"] @ f["A2"])
        elif cfg["type"] == "lora":
            out[module] = s * (f["B"] @ f["A"] - (f["B0"] @ f["A0"] if "B0" in f else 0))
        elif cfg["type"] == "dora":
            w0m = w0[module + ".weight"]
            w = w0m + s * (f["B"] @ f["A"])
            out[module] = (f["m"] / np.linalg.norm(w, axis=1))[:, None] * w - w0m
        else:
            out[module] = s * w0[module + ".weight"] * (f["B"] @ f["A"])
    return out


def test_effective_rank_formula():
    # k equal values: entropy log k, effective rank k exactly
    assert effective_rank(np.array([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0, rel=1e-14)
    assert effective_rank(np.array([5.0])) == pytest.approx(1.0)
    assert effective_rank(np.array([])) == 0.0
    # p = (3/4, 1/4): exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) = 4 / 3^(3/4) = 1.7548...
    assert effective_rank(np.array([3.0, 1.0, 0.0])) == pytest.approx(4 / 3**0.75, rel=1e-14)


def test_energy_rank_formula():
    # energies 81, 9, 9, 1 of 100: top 1 holds 81%, top 2 90% exactly (counted), top 3 99%
    assert energy_rank(np.array([9.0, 3.0, 3.0, 1.0])) == 2
    assert energy_rank(np.array([9.0, 3.0, 3.0, 1.0]), 0.95) == 3
    assert energy_rank(np.array([1.0] * 10)) == 9
    assert energy_rank(np.zeros(3)) == 0


def test_factored_singular_values_match_the_explicit_product():
    gen = torch.Generator().manual_seed(0)
    for m, k, n in [(7, 3, 11), (5, 9, 6), (40, 16, 24)]:  # thin, k > min(m, n), ordinary
        p, q = (
            torch.randn(m, k, generator=gen, dtype=torch.float64),
            torch.randn(k, n, generator=gen, dtype=torch.float64),
        )
        got = factored_singular_values(p, q).numpy()
        ref = np.linalg.svd((p @ q).numpy(), compute_uv=False)
        np.testing.assert_allclose(got[: min(m, k, n)], ref[: min(m, k, n)], rtol=1e-11)
        assert got.size <= min(k, m, n) or np.all(got[min(k, m, n) :] < 1e-10 * got[0])


@pytest.mark.parametrize(
    "adapter",
    [
        {"type": "abba", "r1": 2, "r2": 3},
        {"type": "abba", "r1": 8, "r2": 16},  # r1 r2 = 128 > min(m, n) = 64: dW is full rank
        {"type": "lora", "r": 4},
        {"type": "lora", "r": 3, "init": "pissa"},
        {"type": "hira", "r": 2},
        {"type": "dora", "r": 2},
    ],
    ids=["abba", "abba-fullrank", "lora", "pissa", "hira", "dora"],
)
def test_singular_values_match_numpy_svd_of_the_explicit_dw(tmp_path, tiny_model_dir, adapter):
    run = make_run(tmp_path / "run", tiny_model_dir, seed=1, **adapter)
    if adapter.get("init") == "pissa":  # make_run fills only A and B; PiSSA also stores B0 A0
        t = load_file(run / "adapter_model.safetensors")
        gen = torch.Generator().manual_seed(2)
        for key in [k for k in t if k.endswith(".A")]:
            t[key[:-1] + "A0"] = torch.randn(t[key].shape, generator=gen)
            t[key[:-1] + "B0"] = torch.randn(t[key[:-1] + "B"].shape, generator=gen)
        save_file(t, run / "adapter_model.safetensors")
    w0 = _w0(tiny_model_dir)
    explicit = _explicit_dw(run, w0)
    report = inspect_run(run)
    assert {x.module for x in report.layers} == set(explicit) and len(
        explicit
    ) == 14  # 7 projections x 2 layers
    for layer in report.layers:
        ref = _reference(explicit[layer.module])
        assert layer.singular_values.dtype == np.float64
        assert layer.singular_values.size == ref.size  # same numerical rank
        np.testing.assert_allclose(layer.singular_values, ref, rtol=1e-9, atol=1e-12 * ref[0])
        assert layer.w0_norm == pytest.approx(np.linalg.norm(w0[layer.module + ".weight"]), rel=1e-12)
    bound = {"abba": 6, "abba-fullrank": 64, "lora": 4, "pissa": 6, "hira": 64, "dora": 64}
    kind = "pissa" if adapter.get("init") else "abba-fullrank" if adapter.get("r2") == 16 else adapter["type"]
    q = next(x for x in report.layers if x.module == "model.layers.0.self_attn.q_proj")
    assert q.rank_bound == bound[kind] and q.singular_values.size == bound[kind]  # random factors reach it
    assert q.depth == 0 and q.module_type == "q_proj"
    rank_sum = {"abba": 2 + 3, "lora": 4, "hira": 2}
    if kind in rank_sum:
        # (r1 + r2)(m + n) or r (m + n) per layer; q, o: 64x64, k, v: 32x64, gate, up: 128x64, down: 64x128,
        # so sum (m + n) = 128 + 96 + 96 + 128 + 192 + 192 + 192 = 1024 per block, 2 blocks
        assert report.trainable == rank_sum[kind] * 1024 * 2


def test_full_finetuning_run_is_w_minus_w0(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "full"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "down_proj.weight")):
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(run / "model")
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "adapter": {"type": "full"},
        "data": {"recipe": "gsm8k"},
        "output_dir": str(run),
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    report = inspect_run(run)
    assert report.method == "full" and len(report.layers) == 14
    w0 = _w0(tiny_model_dir)
    trained = {k: v.double().numpy() for k, v in load_file(run / "model" / "model.safetensors").items()}
    for layer in report.layers:
        key = layer.module + ".weight"
        dw = trained[key] - w0[key]
        if not dw.any():  # untouched projections: dW = 0, nothing to rank
            assert layer.singular_values.size == 0 and layer.dw_norm == 0.0
            continue
        np.testing.assert_allclose(layer.singular_values, _reference(dw), rtol=1e-9)
    assert report.trainable == sum(math.prod(v.shape) for v in trained.values())


def test_cli_writes_table_json_and_png(tmp_path, tiny_model_dir):
    abba = make_run(tmp_path / "abba", tiny_model_dir, r1=2, r2=2)
    lora = make_run(tmp_path / "lora", tiny_model_dir, type="lora", r=4)
    (abba / "val_summary.json").write_text(json.dumps({"best_val_loss": 1.5, "last_val_loss": 1.75}))
    out = tmp_path / "inspect"
    result = CliRunner().invoke(app, ["inspect", str(abba), str(lora), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "q_proj" in result.output and "val_loss best 1.5000" in result.output
    data = json.loads((out / "inspect.json").read_text())
    assert [r["method"] for r in data["runs"]] == ["abba", "lora"]
    # (r1 + r2) x sum of (m + n) over the 7 projections (1024) x 2 blocks
    assert data["summary"][0]["best_val_loss"] == 1.5 and "| abba | abba | 8,192 |" in result.output
    layer = data["runs"][1]["layers"][0]
    sv = np.array(layer["singular_values"])
    assert layer["effective_rank"] == pytest.approx(effective_rank(sv)) and layer["numerical_rank"] == 4
    assert layer["rel_norm"] == pytest.approx(layer["dw_fro"] / layer["w0_fro"])
    assert (out / "inspect.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_not_a_run_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no such run directory" in result.output


def test_a_compare_folder_stands_for_its_finished_runs(tmp_path, tiny_model_dir):
    cmp = tmp_path / "cmp"
    make_run(cmp / "runs" / "lora_seed1", tiny_model_dir, type="lora", r=2)
    make_run(cmp / "runs" / "abba_seed1", tiny_model_dir, r1=1, r2=2)
    (cmp / "runs" / "abba_seed2").mkdir()  # still training: no adapter yet, left out
    result = CliRunner().invoke(app, ["inspect", str(cmp), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    runs = json.loads((tmp_path / "o" / "inspect.json").read_text())["runs"]
    assert [Path(r["run"]).name for r in runs] == ["abba_seed1", "lora_seed1"]
