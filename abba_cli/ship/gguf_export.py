"""`abba export --format gguf`: the run merged into its base (abba merge, self-checked) and written as one GGUF
file (gguf_file.py) carrying the tokenizer and the run's prompt format (export_tokenizer.py) in its metadata.

Before the file appears at --out it is read back by an independent reader, transformers' GGUF loader (it
dequantizes), and two comparisons of fp32 logits on merge's check prompts must hold:

- against the merged model with its weights rounded as the file stores them (gguf's own f16/bf16 casts and
  Q8_0 quantize/dequantize): equal up to EXACT_TOLERANCE. Rounding aside, everything the writer decides (tensor
  names, the Q/K permutation, shapes, norm epsilon, rotary base, head counts) must be exact, and any error there
  moves the logits by O(1) of their scale;
- against the merged model as it is, within TOLERANCE[dtype] (max |logit difference| / max |logit|):

    f16   1e-2  weights rounded to 11 significant bits (relative error <= 2^-11 each)
    bf16  5e-2  8 significant bits (<= 2^-8), the bound `abba merge` holds bf16 merges to
    q8_0  1e-1  8-bit integers per block of 32 with one f16 scale: error <= scale/2 = 2^-8 of the block's
                largest value, so smaller entries lose more than in bf16

The tokenizer read back must encode the check prompts to the same ids and carry the same chat template.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from abba_cli.errors import UserError
from abba_cli.ship.gguf_file import GGUF_DTYPES

TOLERANCE = {"f16": 1e-2, "bf16": 5e-2, "q8_0": 1e-1}
# The file read back must compute what the merged weights rounded to its dtype compute: the same fp32 values in
# both models, so only the loaders' operation order could differ (measured: 0).
EXACT_TOLERANCE = 1e-5


def check_gguf_out(out: Path, overwrite: bool) -> Path:
    """--out for a GGUF file: not a directory, not an existing file unless --overwrite."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; --format gguf writes one file (e.g. --out model.gguf)")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out}: exists; pass --overwrite to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"--out {out}: {out.parent} is not a directory")
    return out


def export_gguf(
    out: str | Path,
    run: str | Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    base: str | Path | None = None,
    onto: str = "original",
) -> dict[str, Any]:
    """Merge RUN_DIR's adapter (onto a quantized-base run's original or dequantized base: merge_onto.py) and write
    it as a GGUF file at OUT; returns what was written and checked."""
    from transformers import AutoConfig

    from abba_cli.run.adapter_files import read_run_adapter
    from abba_cli.run.latest import recorded_base
    from abba_cli.ship.export_tokenizer import served_format
    from abba_cli.ship.gguf_file import gguf_architecture
    from abba_cli.ship.merge import merge_run
    from abba_cli.util.files import check_not_inside

    dtype = (dtype or "f16").strip().lower()
    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype!r}: --format gguf writes one of {', '.join(GGUF_DTYPES)}")
    out = check_gguf_out(Path(out), overwrite)
    adapter = read_run_adapter(run)
    base_name = recorded_base(adapter.run_dir, adapter.base_model, base)
    protected = [Path(base_name).expanduser()] if Path(base_name).expanduser().is_dir() else []
    check_not_inside(out, protected, runs=[adapter.root])
    served = served_format(adapter.root, base_name)
    try:
        config = AutoConfig.from_pretrained(base_name)
    except (OSError, ValueError):
        config = None  # a hub id offline: the merged folder's config is checked below, before any writing
    if config is not None:
        gguf_architecture(config, base_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp_name:
        tmp = Path(tmp_name)
        # saved first: a tokenizer GGUF cannot describe is refused before the merge's work
        _save_tokenizer(served.tokenizer, base_name, adapter.run_dir, tmp / "tokenizer")
        merge_run(out=tmp / "merged", run=adapter.run_dir, base=base, onto=onto)
        from abba_cli.ship.gguf_file import write_gguf

        written = write_gguf(
            tmp / "merged", tmp / "tokenizer", tmp / "model.gguf", dtype, Path(base_name).name
        )
        check = check_gguf(tmp / "model.gguf", tmp / "merged", tmp / "tokenizer", dtype)
        _report(written, check, dtype)
        if not check["passed"]:
            raise UserError(_failure(check, dtype, out))
        os.replace(tmp / "model.gguf", out)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB, {dtype}, {served.describe()}); run it with llama.cpp or Ollama")
    return {**written, "check": check, "dtype": dtype, "out": str(out)}


def _save_tokenizer(tokenizer: Any, base_name: str, run_dir: Path, out: Path) -> None:
    """The run's tokenizer saved for the writer, with the base's tokenizer.model beside it (a SentencePiece
    vocabulary's scores live only there); UserError when the writer has no GGUF vocabulary for it."""
    from abba_cli.ship.gguf_vocab import SENTENCEPIECE_FILE, find_sentencepiece_model, tokenizer_kind
    from abba_cli.ship.run_base import run_load_settings

    tokenizer.save_pretrained(out)
    model_file = find_sentencepiece_model(base_name, run_load_settings(run_dir))
    if model_file is not None:
        shutil.copyfile(model_file, out / SENTENCEPIECE_FILE)
    tokenizer_kind(out)


def check_gguf(gguf_path: Path, merged_dir: Path, tokenizer_dir: Path, dtype: str) -> dict[str, Any]:
    """The GGUF file read back by transformers against the merged folder: logits on merge's check prompts (against
    the merged weights rounded as the file stores them, and as they are), the tokenizer's ids, its chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abba_cli.ship.logit_check import CHECK_PROMPTS, compare_logits

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    read_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ids = [tokenizer(p)["input_ids"] for p in CHECK_PROMPTS]
    same_ids = ids == [read_tokenizer(p)["input_ids"] for p in CHECK_PROMPTS]
    same_template = read_tokenizer.chat_template == tokenizer.chat_template

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="float32")
    merged = _logits(model, ids)
    _round_weights(model, dtype)
    rounded = _logits(model, ids)
    del model
    gc.collect()
    read = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")
    got = _logits(read, ids)
    del read
    gc.collect()
    layout = compare_logits(rounded, got)
    rounding = compare_logits(merged, got)
    passed = (
        layout["max_rel_diff"] <= EXACT_TOLERANCE
        and rounding["max_rel_diff"] <= TOLERANCE[dtype]
        and same_ids
        and same_template
    )
    return {
        "vs_rounded_merged": layout,
        "vs_merged": rounding,
        "tolerance_rel": TOLERANCE[dtype],
        "same_token_ids": same_ids,
        "same_chat_template": same_template,
        "passed": passed,
    }


def _round_weights(model: Any, dtype: str) -> None:
    """Every weight the file stores at `dtype` (2-D) replaced by its rounded value, in place."""
    import torch

    from abba_cli.ship.gguf_file import round_like_gguf

    with torch.no_grad():
        for (
            p
        ) in model.parameters():  # a tied embedding is one parameter, rounded once, as the file holds it once
            if p.ndim == 2:
                p.copy_(torch.from_numpy(round_like_gguf(p.detach().float().numpy(), dtype)))


def _logits(model: Any, ids: list[list[int]]) -> list[Any]:
    """fp32 logits of each prompt on its own (no padding)."""
    import torch

    model.eval()
    with torch.inference_mode():
        return [model(torch.tensor([row])).logits[0].float() for row in ids]


def _report(written: dict[str, Any], check: dict[str, Any], dtype: str) -> None:
    types = ", ".join(f"{n} {k}" for k, n in sorted(written["tensors"].items()))
    verdict = "passed" if check["passed"] else "FAILED"
    layout, rounding = check["vs_rounded_merged"], check["vs_merged"]
    print(
        f"GGUF check {verdict}: {written['architecture']} ({types}; tokenizer {written['tokenizer']}) read "
        f"back by transformers: logits vs the merged model rounded to {dtype} {layout['max_rel_diff']:.3g} "
        f"(relative; tolerance {EXACT_TOLERANCE:g}), vs the merged model {rounding['max_rel_diff']:.3g} "
        f"(tolerance {TOLERANCE[dtype]:.3g}, top-1 agreement {rounding['top1_agreement']:.1%}); token ids "
        f"{'equal' if check['same_token_ids'] else 'DIFFER'}, chat template "
        f"{'equal' if check['same_chat_template'] else 'DIFFERS'}"
    )


def _failure(check: dict[str, Any], dtype: str, out: Path) -> str:
    if not check["same_token_ids"]:
        what = "its tokenizer encodes the check prompts to other ids than the run's"
    elif not check["same_chat_template"]:
        what = "its chat template differs from the run's"
    elif check["vs_rounded_merged"]["max_rel_diff"] > EXACT_TOLERANCE:
        what = "its logits are not those of the merged weights it should hold (a layout or metadata error)"
    else:
        rel = check["vs_merged"]["max_rel_diff"]
        what = f"rounding to {dtype} moves the logits by {rel:.3g} (relative), above its tolerance; try --dtype f16"
    return f"GGUF check failed: read back by transformers, {what}; nothing was written to {out}"
