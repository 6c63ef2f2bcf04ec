"""Fine-tune with transformers' own `Trainer`, using abba-cli only for the adapter.

    python examples/train_with_hf_trainer.py --model HuggingFaceTB/SmolLM2-135M-Instruct --out runs/hf-trainer
    abba eval --task gsm8k --run runs/hf-trainer --limit 50
    abba merge --run runs/hf-trainer --out merged/
    abba export --run runs/hf-trainer --format peft-loha --out loha/

The three library calls that matter: `inject_adapters` (replace the target nn.Linear layers by ABBA layers and
freeze everything else), an ordinary training loop (here `Trainer`), and `save_adapter`, which writes the
adapter_config.json + adapter_model.safetensors that `abba eval`, `abba merge` and `abba export` read. Nothing
else is needed in the folder: config.yaml, which `abba train` also writes, is optional for those commands.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from abba_cli.adapters import inject_adapters, save_adapter, trainable_summary
from abba_cli.config import AdapterConfig
from abba_cli.data.prompts import render_prompt
from abba_cli.models.loading import load_base

DATA = Path(__file__).resolve().parent / "data" / "alpaca.jsonl"


def tokenize_alpaca(path: Path, tokenizer, max_len: int) -> list[dict]:
    """Alpaca rows as input_ids/labels, the loss on the response only, with the prompt `abba eval` uses."""
    rows = []
    for line in path.read_text().splitlines():
        ex = json.loads(line)
        prompt = tokenizer(render_prompt(ex["instruction"], ex.get("input")))["input_ids"]
        answer = tokenizer(ex["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_len]
        labels = ([-100] * len(prompt) + answer)[:max_len]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id or local folder"
    )
    parser.add_argument(
        "--data", type=Path, default=DATA, help="Alpaca-style jsonl (instruction, input, output)"
    )
    parser.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    parser.add_argument("--r1", type=int, default=8)
    parser.add_argument("--r2", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-4)
    args = parser.parse_args(argv)

    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    # load_base = AutoModelForCausalLM + AutoTokenizer, plus a pad token and the bundled SmolLM2 when offline.
    model, tokenizer = load_base(args.model, dtype="float32")
    adapter = AdapterConfig(
        type="abba", r1=args.r1, r2=args.r2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    inject_adapters(model, adapter)  # SVD init of B1 A1 from W0, B2 = 0: training starts at the base model
    print(trainable_summary(model))

    scratch = tempfile.mkdtemp(prefix="hf-trainer-")
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=scratch,  # Trainer's own folder; with save_strategy "no" nothing is kept there
            max_steps=args.max_steps,
            per_device_train_batch_size=2,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            logging_steps=5,
            save_strategy="no",
            report_to=[],
        ),
        train_dataset=Dataset.from_list(tokenize_alpaca(args.data, tokenizer, max_len=256)),
        # Pads input_ids with the pad token and labels with -100; works for causal LMs as well.
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    trainer.train()
    shutil.rmtree(scratch, ignore_errors=True)
    # base_model is recorded so that eval/merge/export find the base (a local folder is stored absolute).
    save_adapter(model, adapter, args.out, base_model=args.model)
    print(f"saved the adapter to {args.out}; next: abba merge --run {args.out} --out merged/")
    return args.out


if __name__ == "__main__":
    main()
