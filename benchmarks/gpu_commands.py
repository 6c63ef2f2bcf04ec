"""The real commands on one GPU, each timed with its peak GPU memory: `abba train` (20 steps at 1 x 512 with
gradient checkpointing, at 8 x 512 without, at 1 packed row of 4,096 tokens (data.packing, the chunked loss),
and at 8 x 512 with `train.compile`, recompiles logged), `abba eval
--task gsm8k --limit 64` at batch size 8 and at the device's default, and `abba merge`, on a random-weight
Llama-3.2-1B-shaped model built here with a real tokenizer (random weights: the timings and memory are the
model's, the answers are noise).

Each command runs in this process through the CLI's own entry point, so `torch.cuda.max_memory_allocated` is its
peak; the results JSON is written after every command (a timeout loses at most the one running).

    python -m benchmarks.gpu_commands --tokenizer DIR --train-text rows.jsonl --out gpu_commands.json
    python -m benchmarks.gpu_commands --smoke --tokenizer DIR --train-text rows.jsonl --out /tmp/c.json   # CPU
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks import common

SHAPES = {  # Llama-3.2-1B's config.json; smoke: a 2-layer stand-in for the CPU
    "full": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
}  # fmt: skip
# steps, eval --limit, the larger micro-batch, sequence length, eval's token budget, whether a compiled run is
# timed (not with --smoke: inductor's C++ build takes minutes on a CPU; tests/train cover train.compile)
SETTINGS = {
    "full": dict(steps=20, limit=64, micro=8, seq=512, packed_seq=4096, new_tokens=None, compile=True),
    "smoke": dict(steps=2, limit=4, micro=2, seq=64, packed_seq=256, new_tokens=8, compile=False),
}


def build_model(tokenizer_dir: Path, out: Path, shape: dict[str, int], device: str) -> Path:
    """A random-weight Llama with `shape` and the tokenizer's vocabulary, saved in bf16 with the tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        **shape,
        vocab_size=len(tok),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_name(s: dict[str, Any], micro: int, ckpt: bool, compile_: bool, packed: bool) -> str:
    """The folder of one `abba train` of this stage, e.g. train_8x512 or train_1x4096_packed."""
    seq = s["packed_seq"] if packed else s["seq"]
    suffixes = ("_ckpt" if ckpt else "") + ("_compile" if compile_ else "") + ("_packed" if packed else "")
    return f"train_{micro}x{seq}{suffixes}"


def train_config(
    res: Path,
    model: Path,
    text: Path,
    s: dict[str, Any],
    micro: int,
    ckpt: bool,
    compile_: bool,
    packed: bool = False,
):
    """A run config: ABBA r1 = r2 = 16 on every linear layer, bf16, `steps` steps of `micro` x `seq` tokens;
    `packed`: rows of `packed_seq` tokens packed from the same examples (data.packing, the loss `auto` picks)."""
    seq = s["packed_seq"] if packed else s["seq"]
    name = run_name(s, micro, ckpt, compile_, packed)
    cfg = {
        "model": {"name_or_path": str(model), "dtype": "bfloat16"},
        "adapter": {"type": "abba", "r1": 16, "r2": 16, "alpha": 32.0, "scaling": "released",
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "data": {"recipe": "text", "path": str(text), "max_seq_len": seq, "cache": False, "packing": packed},
        "train": {"max_steps": s["steps"], "micro_batch_size": micro, "grad_accum_steps": 1, "lr": 1e-4,
                  "mixed_precision": "bf16", "gradient_checkpointing": ckpt, "compile": compile_,
                  "save_every": None, "log_every": 1},
        "eval": {"tasks": []},
        "output_dir": str(res / name),
    }  # fmt: skip
    path = res / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return name, path


def run_command(args: list[str], device: str) -> dict[str, Any]:
    """`abba ARGS` in this process: seconds, exit code and peak GPU memory (None on the CPU)."""
    from abba_cli.cli import app

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    row: dict[str, Any] = {"args": args}
    try:
        app(args, standalone_mode=False)
        row["exit"] = 0
    except SystemExit as stop:
        row["exit"] = stop.code
    except Exception as err:  # noqa: BLE001 - one failed command must not lose the others
        row |= {"exit": 1, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
    row["seconds"] = time.perf_counter() - t0
    row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    return row


def _train_figures(run: Path) -> dict[str, Any]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    later = [r for r in rows if r["step"] > 2]  # past compilation and the first allocations
    per_step = None
    if len(later) > 1:
        per_step = (later[-1]["elapsed_s"] - later[0]["elapsed_s"]) / (later[-1]["step"] - later[0]["step"])
    return {"steps": rows[-1]["step"], "loss": rows[-1]["loss"], "s_per_step_after_2": per_step}


def _eval_figures(out: Path) -> dict[str, Any]:
    m = json.loads((out / "gsm8k" / "metrics.json").read_text())
    return {k: m[k] for k in ("n", "batch_size", "seconds", "examples_per_s", "processes", "device")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.arg_parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="a 2-layer model on the CPU, 2 steps, 4 questions")
    p.add_argument("--device", help="default: cuda, or cpu with --smoke")
    p.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer folder (SmolLM2's on the GPU)")
    p.add_argument(
        "--train-text", type=Path, required=True, help="JSONL rows {text} of at least --seq tokens"
    )
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    size = "smoke" if args.smoke else "full"
    s, device = SETTINGS[size], args.device or ("cpu" if args.smoke else "cuda")
    res_dir = args.out.parent / "commands"
    res_dir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"machine": common.machine_info(device), "settings": s, "commands": {}}
    t0 = time.perf_counter()
    model = build_model(args.tokenizer, res_dir / "llama1b-random", SHAPES[size], device)
    res["build_model_s"] = time.perf_counter() - t0
    common.write_json(args.out, res)

    def record(name: str, cmd: list[str], figures=None) -> None:
        print(f"== {name}: abba {' '.join(cmd)}", file=sys.stderr, flush=True)
        row = run_command(cmd, device)
        if row["exit"] == 0 and figures is not None:
            try:
                row["figures"] = figures()
            except (OSError, KeyError, ValueError) as err:  # the command's files lack a figure: say which
                row["figures_error"] = f"{type(err).__name__}: {err}"
        res["commands"][name] = row
        print(
            f"== {name}: exit {row['exit']}, {row['seconds']:.1f} s, peak {row['peak_gpu_bytes']}",
            file=sys.stderr,
        )
        common.write_json(args.out, res)

    # (micro-batch, checkpointing, compile, packed): the packed run is 1 row of packed_seq tokens
    runs = [(1, True, False, False), (s["micro"], False, False, False), (1, False, False, True)] + (
        [(s["micro"], False, True, False)] if s["compile"] else []
    )
    for micro, ckpt, compile_, packed in runs:
        name, config = train_config(res_dir, model, args.train_text, s, micro, ckpt, compile_, packed)
        record(name, ["train", str(config)], lambda name=name: _train_figures(res_dir / name))
    trained = res_dir / run_name(s, s["micro"], False, False, False)  # what merge and eval start from
    # merge first and the batch-8 eval last: if the stage's time runs out, the slowest figure is the one lost
    record("merge", ["merge", "--run", str(trained), "--out", str(res_dir / "merged")])
    budget = ["--max-new-tokens", str(s["new_tokens"])] if s["new_tokens"] else []
    for label, batch in (("eval_gsm8k_device_default", []), ("eval_gsm8k_bs8", ["--batch-size", "8"])):
        out = res_dir / label
        cmd = ["eval", "--task", "gsm8k", "--run", str(trained), "--limit", str(s["limit"]), *batch, *budget]
        record(label, [*cmd, "--out", str(out)], lambda out=out: _eval_figures(out))
    return res


if __name__ == "__main__":
    main()
