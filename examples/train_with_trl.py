"""Fine-tune with TRL's `SFTTrainer`, using abba-cli only for the adapter (needs: pip install 'abba-cli[trl]').

    python examples/train_with_trl.py --model HuggingFaceTB/SmolLM2-135M-Instruct --out runs/trl
    abba eval --task gsm8k --run runs/trl --limit 50
    abba merge --run runs/trl --out merged/

As in train_with_hf_trainer.py: `inject_adapters` before the trainer sees the model (pass SFTTrainer no
peft_config: the model already holds its trainable ABBA factors), `save_adapter` after training. The data is a
prompt-completion dataset rendered with the Alpaca prompt `abba eval` uses, so SFTTrainer computes the loss on
the completion only.
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

    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_base(args.model, dtype="float32")
    adapter = AdapterConfig(
        type="abba", r1=args.r1, r2=args.r2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    inject_adapters(model, adapter)
    print(trainable_summary(model))

    rows = [json.loads(line) for line in args.data.read_text().splitlines()]
    data = Dataset.from_list(
        [{"prompt": render_prompt(r["instruction"], r.get("input")), "completion": r["output"]} for r in rows]
    )
    scratch = tempfile.mkdtemp(prefix="trl-")
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=scratch,  # SFTTrainer's own folder; with save_strategy "no" nothing is kept there
            max_steps=args.max_steps,
            per_device_train_batch_size=2,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            max_length=256,
            logging_steps=5,
            save_strategy="no",
            report_to=[],
            # SFTConfig turns bf16 autocast on by default, which a CPU-only machine refuses; ABBA layers run under
            # autocast (fp32 factors, bf16 matmuls) where the GPU supports it.
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        ),
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    shutil.rmtree(scratch, ignore_errors=True)
    save_adapter(model, adapter, args.out, base_model=args.model)
    print(f"saved the adapter to {args.out}; next: abba merge --run {args.out} --out merged/")
    return args.out


if __name__ == "__main__":
    main()
