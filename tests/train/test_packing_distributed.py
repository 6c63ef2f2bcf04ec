"""Packing and the chunked loss under sharding, on 2 CPU processes (torchrun, gloo): FSDP2 and DeepSpeed ZeRO-3
shard the (tied) output head, which the chunked loss must gather whole in forward and in backward, with each
process taking a different number of 5-token chunks. One launch per strategy (packed rows, chunked loss) ends at
the adapter of one process with the same global batch of rows and the whole-logits loss.

Tolerance as tests/test_distributed.py: the same sums in another order, 1e-4 of each tensor's scale.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_tiny_llama, build_tiny_tokenizer
from helpers import subprocess_env, tiny_config
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TIMEOUT_S = 300
WORKER = Path(__file__).with_name("chunk_worker.py")
STEPS = 4


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama-tied")
    tok = build_tiny_tokenizer()
    build_tiny_llama(len(tok), tie_word_embeddings=True).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _config(tmp: Path, model_dir: Path, out: str, loss_impl: str, accum: int) -> Path:
    rows = [
        {
            "question": "Natalia sold clips" + " to friends" * (i % 7) + f" {i}?",
            "answer": f"{'so ' * (i % 5)}#### {i}",
        }
        for i in range(24)
    ]
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tiny_config(
        tmp,
        model_dir,
        out,
        adapter={"target_modules": ["q_proj", "v_proj", "down_proj"]},
        data={"path": str(tmp / "rows.jsonl"), "packing": True, "max_seq_len": 160},
        train={
            "max_steps": STEPS,
            "micro_batch_size": 1,
            "grad_accum_steps": accum,
            "loss_impl": loss_impl,
            "max_grad_norm": 0.1,
        },
    )


def _run(tmp: Path, cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    env = subprocess_env(tmp, ACCELERATE_USE_CPU="true", ABBA_TEST_CHUNK_TOKENS="5", **env)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def single(tied_model_dir, tmp_path_factory) -> Path:
    """One process, whole-logits loss, 2 rows per step: the global batch of 2 processes x 1 row."""
    tmp = tmp_path_factory.mktemp("packed-single")
    p = _run(tmp, [sys.executable, str(WORKER), "train", str(_config(tmp, tied_model_dir, "one", "full", 2))])
    rows = int(re.search(r"packing: 24 examples in (\d+) rows", p.stderr).group(1))
    assert STEPS * 2 <= rows < 24  # the steps stay in the first epoch, and rows hold several examples
    return tmp / "one"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# liger: a float64 stand-in of the library (chunk_worker.py) behind the fused loss, which gathers the head as
# chunked does (zero3 with cce passes too, but adds a DeepSpeed start-up of ~100 s to the suite).
@pytest.mark.parametrize(("strategy", "impl"), [("fsdp", "chunked"), ("zero3", "chunked"), ("fsdp", "liger")])
def test_packed_chunked_two_processes_match_one(strategy, impl, single, tied_model_dir, tmp_path):
    if strategy == "zero3":
        pytest.importorskip(
            "deepspeed", reason="DeepSpeed is not installed (pip install 'abba-cli[deepspeed]')"
        )
    config = _config(tmp_path, tied_model_dir, "two", impl, 1)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    p = _run(
        tmp_path,
        [*launch, str(WORKER), "train", str(config), "--set", f"distributed.strategy={strategy}"],
        **({} if impl == "chunked" else {"ABBA_TEST_FAKE_FUSED": "1"}),
    )
    assert "x 2 process(es) (" in p.stderr and f"loss: {impl} " in p.stderr
    ref, got = (
        load_file(single / "adapter_model.safetensors"),
        load_file(tmp_path / "two" / "adapter_model.safetensors"),
    )
    assert ref.keys() == got.keys()
    for key in ref:
        scale = float(ref[key].abs().max())
        assert float((got[key] - ref[key]).abs().max()) <= 1e-4 * max(scale, 1e-6), key
    assert any(float(v.abs().max()) > 0 for k, v in ref.items() if k.endswith(".B2"))  # it trained
    m1, m2 = _metrics(single), _metrics(tmp_path / "two")
    for key in ("loss", "grad_norm", "tokens"):
        assert [r[key] for r in m2] == pytest.approx([r[key] for r in m1], rel=1e-4)
