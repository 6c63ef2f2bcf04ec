"""train.loss_impl cce | liger: refused in one line where the library, triton or CUDA is missing; where they run,
the wiring (target rows, the library's call, gradients back to the hidden states and a trained head, the global
batch's normalisation) gives the full loss's values. Neither library runs on this CPU machine (both need triton and
CUDA), so their entry points are replaced by float64 references with the libraries' own signatures."""

from __future__ import annotations

import sys

import fake_fused_kernels
import pytest
import torch
from helpers import cli, cli_error_line, tiny_config, tiny_raw_config, train_in_process
from test_chunked_loss import _batch, _Cfg, _loss_and_grads, _model  # the same tiny model and batch

from abba_cli.config import RunConfig
from abba_cli.errors import UserError
from abba_cli.train import fused_cross_entropy
from abba_cli.train.loss import check_loss_impl, micro_batch_loss, resolve_loss_impl


@pytest.fixture
def fake_libraries(monkeypatch):
    for name, module in fake_fused_kernels.fake_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    fake_fused_kernels.Calls.n = 0
    return fake_fused_kernels.Calls


@pytest.mark.parametrize("impl", ["cce", "liger"])
@pytest.mark.parametrize(
    "adapter", ["abba", "full"]
)  # full: the tied embedding's gradient comes back through it
def test_fused_matches_full_loss_and_gradients(impl, adapter, fake_libraries):
    model = _model(adapter)
    loss_full, grads_full = _loss_and_grads(model, "full")
    loss_fused, grads_fused = _loss_and_grads(model, impl)
    assert fake_libraries.n == 1  # the library ran, once for the micro-batch
    assert loss_fused == pytest.approx(loss_full, rel=1e-6)
    assert grads_full.keys() == grads_fused.keys() and grads_full
    for name, ref in grads_full.items():
        assert (grads_fused[name] - ref).abs().max() <= 1e-5 * ref.abs().max(), name


def test_fused_takes_no_gradients_under_no_grad(fake_libraries):
    model = _model("full")  # the head's weight trains, yet validation needs no gradient of it
    with torch.no_grad():
        loss = micro_batch_loss(model, _batch(), "liger")
        ref = micro_batch_loss(model, _batch(), "full")
    assert not loss.requires_grad and float(loss) == pytest.approx(float(ref), rel=1e-6)


def test_fused_under_bf16_autocast_gets_one_dtype(fake_libraries, monkeypatch):
    seen = []
    real = fused_cross_entropy.library_kernel

    def recording(impl):
        kernel = real(impl)
        return lambda rows, weight, targets: (
            seen.append((rows.dtype, weight.dtype)) or kernel(rows, weight, targets)
        )

    monkeypatch.setattr(fused_cross_entropy, "library_kernel", recording)
    model = _model("abba")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        micro_batch_loss(model, _batch(), "cce").backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)]  # the fp32 head cast as F.linear under autocast would


def test_training_with_a_fused_loss_trains_what_full_trains(
    tmp_path, tiny_model_dir, fake_libraries, monkeypatch
):
    """Two optimizer steps of 2 micro-batches each: the summed loss divided by the global batch's target tokens."""
    monkeypatch.setattr(fused_cross_entropy, "fused_loss_unavailable", lambda impl, device_type: None)
    trained = {}
    for impl in ("full", "cce"):
        raw = tiny_raw_config(
            tmp_path, tiny_model_dir, impl, train={"loss_impl": impl, "grad_accum_steps": 2}
        )
        trained[impl] = train_in_process(RunConfig.model_validate(raw))
    assert fake_libraries.n == 4
    (metrics_full, full), (metrics_cce, cce) = trained["full"], trained["cce"]
    assert [m["loss"] for m in metrics_cce] == pytest.approx([m["loss"] for m in metrics_full], rel=1e-5)
    for name, ref in full.items():
        assert torch.allclose(cce[name], ref, rtol=1e-4, atol=1e-6), name


def test_refused_without_cuda_or_the_library(tmp_path, tiny_model_dir):
    cfg = RunConfig.model_validate(tiny_raw_config(tmp_path, tiny_model_dir, train={"loss_impl": "cce"}))
    with pytest.raises(
        UserError, match=r"^train.loss_impl cce: needs a CUDA GPU \(training runs on cpu here\)"
    ):
        check_loss_impl(cfg, "cpu")
    cfg.train.loss_impl = "liger"  # on a GPU machine without the library (this one has neither)
    with pytest.raises(
        UserError, match=r"needs liger-kernel, which is not installed \(pip install 'abba-cli\[liger\]'\)"
    ):
        check_loss_impl(cfg, "cuda")
    cfg.train.loss_impl = "chunked"
    check_loss_impl(cfg, "cpu")  # the others need nothing


def test_refused_without_triton(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    found = {"cut_cross_entropy": object(), "triton": None}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: found[name] if name in found else real(name, *a)
    )
    assert fused_cross_entropy.fused_loss_unavailable("cce", "cuda") == (
        "needs triton for cut-cross-entropy's kernels, which is not installed (pip install triton)"
    )


@pytest.mark.parametrize("command", ["train", "validate"])
def test_the_cli_refuses_in_one_line(tmp_path, tiny_model_dir, command):
    config = tiny_config(tmp_path, tiny_model_dir, train={"loss_impl": "liger"})
    result = cli(command, config)
    assert result.exit_code == 2, result.output
    line = cli_error_line(result)
    assert "train.loss_impl liger: needs a CUDA GPU" in line and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_fused_refuses_a_model_that_transforms_its_logits():
    model = _model("lora")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(UserError, match="train.loss_impl cce: .*final_logit_softcapping"):
        resolve_loss_impl(_Cfg("cce", 8, 4096), model)
    assert resolve_loss_impl(_Cfg("liger", 8, 4096), _model("lora")) == "liger"
