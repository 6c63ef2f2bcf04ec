"""LoRA-Pro: the closed form against a float64 implementation written here (explicit inverses, scipy's Sylvester
solver), the projection property the paper states, the optimizer step against a float64 re-implementation of the
reference algorithm, and training / export / refusals through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import UNSET, cli, tiny_config
from safetensors.torch import load_file

from abba_cli.train.lora_pro import (
    RIDGE,
    LoRAProAdamW,
    _Gram,
    adjusted_gradients,
    equivalent_gradient,
    solve_sylvester_symmetric,
)

scipy_linalg = pytest.importorskip("scipy.linalg", reason="scipy is the independent Sylvester solver here")

M, N, R, S = 9, 7, 3, 1.7


def _factors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(R, N, generator=g, dtype=torch.float64)
    B = torch.randn(M, R, generator=g, dtype=torch.float64)
    G = torch.randn(M, N, generator=g, dtype=torch.float64)
    return A, B, G


def _sylvester(a, b, q):
    return torch.from_numpy(scipy_linalg.solve_sylvester(a.numpy(), b.numpy(), q.numpy()))


def _closed_form(A, B, G, s):
    """Theorems 2.1 and 2.2 as printed, exact inverses (full-rank factors), X from scipy."""
    gA_lora, gB_lora = s * B.T @ G, s * G @ A.T
    BtB_inv, AAt_inv = torch.linalg.inv(B.T @ B), torch.linalg.inv(A @ A.T)
    X = _sylvester(B.T @ B, A @ A.T, -(1 / s**2) * BtB_inv @ gA_lora @ A.T)
    gA = (1 / s**2) * BtB_inv @ gA_lora + X @ A
    gB = (1 / s**2) * (torch.eye(M, dtype=torch.float64) - B @ BtB_inv @ B.T) @ gB_lora @ AAt_inv - B @ X
    return gA, gB, gA_lora, gB_lora


def test_sylvester_solver_matches_scipy():
    g = torch.Generator().manual_seed(1)
    p, q = (
        torch.randn(4, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 5, generator=g, dtype=torch.float64),
    )
    P, Q = p @ p.T, q.T @ q  # PSD, Q singular (rank 3 of 5)
    C = torch.randn(4, 5, generator=g, dtype=torch.float64)
    X = solve_sylvester_symmetric(P, Q, C)
    torch.testing.assert_close(P @ X + X @ Q, C, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(X, _sylvester(P, Q, C), rtol=1e-9, atol=1e-10)


def test_adjusted_gradients_are_the_papers_closed_form():
    A, B, G = _factors()
    gA_ref, gB_ref, gA_lora, gB_lora = _closed_form(A, B, G, S)
    gA, gB = adjusted_gradients(_Gram(A, B), gA_lora, gB_lora, S)
    # The only difference is the reference code's ridge (1e-8 I) on BᵀB and AAᵀ, O(1) here.
    torch.testing.assert_close(gA, gA_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gB, gB_ref, rtol=1e-6, atol=1e-6)


def test_equivalent_gradient_is_the_projection_of_g_and_the_least_squares_optimum():
    A, B, G = _factors(2)
    gA_lora, gB_lora = S * B.T @ G, S * G @ A.T
    gram = _Gram(A, B)
    gA, gB = adjusted_gradients(gram, gA_lora, gB_lora, S)
    g_eq = equivalent_gradient(A, B, gA, gB, S)
    P_B = B @ torch.linalg.inv(B.T @ B) @ B.T
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    torch.testing.assert_close(g_eq, P_B @ G + G @ P_A - P_B @ G @ P_A, rtol=1e-6, atol=1e-6)
    # X changes how the step splits between A and B, not the equivalent gradient.
    gA0, gB0 = adjusted_gradients(gram, gA_lora, gB_lora, S, with_x=False)
    assert not torch.allclose(gA0, gA)
    torch.testing.assert_close(equivalent_gradient(A, B, gA0, gB0, S), g_eq, rtol=1e-6, atol=1e-6)
    # The least-squares optimum over every (gA, gB), by brute force: vec(s B gA + s gB A) = J [vec gA; vec gB].
    eye_n, eye_m = torch.eye(N, dtype=torch.float64), torch.eye(M, dtype=torch.float64)
    J = torch.cat([S * torch.kron(B, eye_n), S * torch.kron(eye_m, A.T.contiguous())], dim=1)  # row-major vec
    # J has an r²-dimensional null space ((Y A, -B Y) for any Y): project onto its range by SVD, rank explicit.
    U, sv, _ = torch.linalg.svd(J, full_matrices=False)
    U = U[:, sv > 1e-9 * sv[0]]
    assert U.shape[1] == R * (M + N) - R * R
    torch.testing.assert_close(g_eq.reshape(-1, 1), U @ (U.T @ G.reshape(-1, 1)), rtol=1e-6, atol=1e-6)
    # X of Theorem 2.2: the stationary point of ||gA - gA_lora||² + ||gB - gB_lora||² along (Y A, -B Y).
    stationary = (gA - gA_lora) @ A.T - B.T @ (gB - gB_lora)
    assert float(stationary.abs().max()) < 1e-6 * float(gA_lora.abs().max())


def _reference_steps(A, B, grads, s, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    """The reference algorithm re-written in float64: AdamW moments of the equivalent gradient, the closed form
    on Adam's direction, a plain step. grads(A, B) gives the LoRA gradients at the current factors."""
    m1 = v = torch.zeros(B.shape[0], A.shape[1], dtype=torch.float64)
    eye_r = torch.eye(A.shape[0], dtype=torch.float64)
    for t in range(1, 4):
        gA_lora, gB_lora = grads(A, B)
        BtB_inv = torch.linalg.inv(B.T @ B + RIDGE * eye_r)
        AAt_inv = torch.linalg.inv(A @ A.T + RIDGE * eye_r)
        I_PB = torch.eye(B.shape[0], dtype=torch.float64) - B @ BtB_inv @ B.T
        g_eq = s * (B @ (BtB_inv @ gA_lora / s**2) + (I_PB @ gB_lora @ AAt_inv / s**2) @ A)
        m1 = betas[0] * m1 + (1 - betas[0]) * g_eq
        v = betas[1] * v + (1 - betas[1]) * g_eq * g_eq
        d = (m1 / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        gA2, gB2 = s * B.T @ d, s * d @ A.T
        X = _sylvester(B.T @ B, A @ A.T, -(1 / s**2) * BtB_inv @ gA2 @ A.T)
        gA = BtB_inv @ gA2 / s**2 + X @ A
        gB = I_PB @ gB2 @ AAt_inv / s**2 - B @ X
        A, B = A * (1 - lr * wd) - lr * gA, B * (1 - lr * wd) - lr * gB
    return A, B


def test_optimizer_steps_match_a_float64_reimplementation_from_b_zero():
    A0, _, _ = _factors(3)
    B0 = torch.zeros(M, R, dtype=torch.float64)  # LoRA's init: step 1 has BᵀB = 0
    target = torch.randn(M, N, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def grads(A, B):  # loss 0.5 ||s B A - target||²: dL/dW = s B A - target
        G = S * B @ A - target
        return S * B.T @ G, S * G @ A.T

    A_ref, B_ref = _reference_steps(A0.clone(), B0.clone(), grads, S, lr=0.05, wd=0.1)
    A, B = torch.nn.Parameter(A0.clone()), torch.nn.Parameter(B0.clone())
    opt = LoRAProAdamW([A, B], S, lr=0.05, weight_decay=0.1)
    for _ in range(3):
        A.grad, B.grad = grads(A.detach(), B.detach())
        opt.step()
    torch.testing.assert_close(A.detach(), A_ref, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(B.detach(), B_ref, rtol=1e-6, atol=1e-8)
    assert opt.state[A]["step"] == 3 and opt.state[A]["exp_avg"].shape == (M, N)


def test_a_small_step_moves_w_by_the_projected_adam_direction():
    A0, B0, G = _factors(5)
    A, B = torch.nn.Parameter(A0.clone()), torch.nn.Parameter(B0.clone())
    A.grad, B.grad = S * B0.T @ G, S * G @ A0.T
    lr = 1e-6
    LoRAProAdamW([A, B], S, lr=lr).step()
    dW = S * (B.detach() @ A.detach() - B0 @ A0)
    # Step 1: Adam's direction is sign(g~) (up to eps); W moves by -lr times its projection, to first order in lr.
    gram = _Gram(A0, B0)
    g_eq = equivalent_gradient(A0, B0, *adjusted_gradients(gram, S * B0.T @ G, S * G @ A0.T, S), S)
    d = g_eq / (g_eq.abs() + 1e-8)
    P_B = B0 @ torch.linalg.inv(B0.T @ B0) @ B0.T
    P_A = A0.T @ torch.linalg.inv(A0 @ A0.T) @ A0
    want = -lr * (P_B @ d + d @ P_A - P_B @ d @ P_A)
    assert float((dW - want).abs().max() / want.abs().max()) < 1e-4


# --------------------------------------------------------------------------- through the CLI


def _train(tmp_path, tiny_model_dir, out, type_, **dist):
    adapter = {"type": type_, "r1": UNSET, "r2": UNSET, "r": 2}
    cfg = tiny_config(tmp_path, tiny_model_dir, out, adapter=adapter, train={"max_steps": 3, "lr": 1e-3})
    if dist:
        import yaml

        raw = yaml.safe_load(cfg.read_text())
        raw["distributed"] = dist
        cfg.write_text(yaml.safe_dump(raw))
    return cli("train", cfg)


def test_train_steps_with_lora_pro_and_exports_as_lora(tiny_model_dir, tmp_path):
    runs = {}
    for kind in ("lora", "lora_pro"):
        result = _train(tmp_path, tiny_model_dir, kind, kind)
        assert result.exit_code == 0, result.output
        runs[kind] = load_file(tmp_path / kind / "adapter_model.safetensors")
    assert json.loads((tmp_path / "lora_pro" / "adapter_config.json").read_text())["type"] == "lora_pro"
    from transformers import AutoModelForCausalLM

    from abba_cli.adapters import load_adapter

    assert (
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "lora_pro").type
        == "lora_pro"
    )
    key = next(k for k in runs["lora"] if k.endswith(".B"))
    assert runs["lora_pro"][key].abs().max() > 0  # it trained
    assert not torch.allclose(runs["lora"][key], runs["lora_pro"][key])  # and not as AdamW on A, B does
    result = cli(
        "export", "--format", "peft-lora", "--run", tmp_path / "lora_pro", "--out", tmp_path / "peft"
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"] is False


def test_sharded_strategies_are_refused_in_one_line(tiny_model_dir, tmp_path):
    result = _train(tmp_path, tiny_model_dir, "fsdp", "lora_pro", strategy="fsdp")
    assert result.exit_code == 2 and "use distributed.strategy: ddp" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "fsdp").exists()


def test_resume_restores_the_full_size_moments_exactly(tiny_model_dir, tmp_path, monkeypatch):
    """Stopped after step 1 (checkpoint with the optimizer state), resumed to step 3: the same adapter as a run
    that was never stopped."""
    from helpers import request_stop

    assert _train(tmp_path, tiny_model_dir, "whole", "lora_pro").exit_code == 0
    with monkeypatch.context() as patch:
        request_stop(patch)
        assert _train(tmp_path, tiny_model_dir, "stopped", "lora_pro").exit_code == 143
    ckpt = next((tmp_path / "stopped" / "checkpoints").iterdir())
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    assert state[0]["step"] == 1 and state[0]["exp_avg_sq"].shape == (64, 64)  # q_proj's (m, n)
    result = cli("train", tmp_path / "stopped" / "config.yaml", "--resume")
    assert result.exit_code == 0, result.output
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "stopped" / "adapter_model.safetensors")
    assert sorted(whole) == sorted(resumed) and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_validate_states_the_full_size_optimizer_state(tiny_model_dir, tmp_path):
    adapter = {"type": "lora_pro", "r1": UNSET, "r2": UNSET, "r": 2}
    result = cli("validate", tiny_config(tmp_path, tiny_model_dir, "run", adapter=adapter))
    assert result.exit_code == 0, result.output
    # q_proj 64 x 64 and v_proj 32 x 64 in 2 blocks, two moments each
    values = 2 * 2 * (64 * 64 + 32 * 64)
    assert f"{values:,} fp32 values" in result.output
