"""Helpers shared by several test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from abba_cli.adapters import adapter_layers, inject_adapters, save_adapter
from abba_cli.config import AdapterConfig

PROMPTS = ["The answer is: 42", "Natalia sold clips to 48 of her friends in April."]
REPO = Path(__file__).resolve().parents[1]
# The chat template of a chat-trained run (ChatML), which exports must carry to what serves them.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_run(run_dir: Path, base_dir: Path, seed: int = 0, **adapter) -> Path:
    """A run directory built with the adapter API on `base_dir`, factors random so that dW != 0."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter.get("type", "abba") == "abba":
        # Random factors of 0.3 already give a large dW; at the default alpha 16 (s = 256 / sqrt(r1 r2)) it
        # would swamp W0 and the fp32 round-off of merge checks. alpha 4 keeps dW the size of W0.
        adapter.setdefault("alpha", 4.0)
    cfg = AdapterConfig(**adapter)
    inject_adapters(model, cfg, init=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.factors().values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    save_adapter(model, cfg, run_dir, base_model=str(base_dir))
    return run_dir


def make_chat_run(run_dir: Path, base_dir: Path, **adapter) -> Path:
    """make_run's run, recorded as trained on examples/data/chat.jsonl with CHATML as its chat template."""
    run = make_run(run_dir, base_dir, **adapter)
    config = {
        "model": {"name_or_path": str(base_dir)},
        "adapter": adapter,
        "data": {
            "recipe": "chat",
            "path": str(REPO / "examples" / "data" / "chat.jsonl"),
            "chat_template": CHATML,
        },
        "output_dir": str(run),
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def logits(model, tok_dir: Path) -> list[torch.Tensor]:
    """Logits of every PROMPTS entry (fp32), one prompt at a time, so no padding is involved."""
    tok = AutoTokenizer.from_pretrained(tok_dir)
    with torch.inference_mode():
        return [model(**tok(p, return_tensors="pt")).logits[0].float() for p in PROMPTS]


def max_rel(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Largest absolute difference relative to the reference logits' scale."""
    scale = max(float(r.abs().max()) for r in ref)
    return max(float((r - g).abs().max()) for r, g in zip(ref, got, strict=True)) / scale


def ours_vs_peft(base_dir: Path, run_dir: Path, export_dir: Path) -> tuple[float, float]:
    """(relative diff ours vs PEFT, relative effect of the adapter vs the bare base) on PROMPTS, fp32."""
    from peft import PeftModel

    from abba_cli.adapters import load_adapter

    ours = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    load_adapter(ours, run_dir)
    ref = logits(ours, base_dir)
    base = logits(AutoModelForCausalLM.from_pretrained(base_dir).eval(), base_dir)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), export_dir).eval()
    return max_rel(ref, logits(peft_model, base_dir)), max_rel(ref, base)


def replace_training_loss(monkeypatch, loss_fn) -> None:
    """Every training run of the test computes its loss with `loss_fn(logits, labels)`: the run object's seam
    (`Run.loss_fn`), so a test can fail or count a step without patching a private function."""
    from abba_cli.train.context import Run

    monkeypatch.setattr(Run, "loss_fn", lambda self, logits, labels: loss_fn(logits, labels))


def request_stop(monkeypatch) -> None:
    """Every training run of the test sees a stop request after its first step, as after a SIGTERM."""
    from abba_cli.train.context import Run

    monkeypatch.setattr(Run, "stop_requested", lambda self: True)


# ----------------------------------------------------------------------------------------------- runs and the CLI


def gsm8k_rows(n: int, offset: int = 0, answer_offset: int = 0) -> list[dict]:
    """GSM8K-shaped rows the tiny model trains on (question, answer ending in '#### N')."""
    return [
        {
            "question": f"Tom has {i} apples and buys {i + 2}. How many?",
            "answer": f"#### {2 * i + 2 + answer_offset}",
        }
        for i in range(offset, offset + n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# A section key set to UNSET is left out of the config, so the config's own default applies.
UNSET = object()


def _without_unset(section: dict) -> dict:
    return {k: v for k, v in section.items() if v is not UNSET}


def tiny_raw_config(
    tmp_path: Path,
    model_dir: Path,
    out: str = "run",
    *,
    model: dict | None = None,
    adapter: dict | None = None,
    data: dict | None = None,
    train: dict | None = None,
) -> dict:
    """The one run config the tests train the tiny model with; each section given is merged over its defaults.

    Defaults: fp32, ABBA r1 = r2 = 2 on q_proj and v_proj, 8 GSM8K-shaped rows from tmp_path/train.jsonl (written
    unless `data` names its own `path`), 2 steps of micro-batch 2 at lr 1e-2 without warmup. `out` is a folder
    under tmp_path, or an absolute or ~ path kept as given.
    """
    data = dict(data or {})
    if "path" not in data:  # (a recipe with its own source passes "path": UNSET)
        rows_file = tmp_path / "train.jsonl"
        if not rows_file.exists():
            write_jsonl(rows_file, gsm8k_rows(8))
        data["path"] = str(rows_file)
    return {
        "model": _without_unset({"name_or_path": str(model_dir), "dtype": "float32", **(model or {})}),
        "adapter": _without_unset(
            {"type": "abba", "r1": 2, "r2": 2, "target_modules": ["q_proj", "v_proj"], **(adapter or {})}
        ),
        "data": _without_unset({"recipe": "gsm8k", "max_seq_len": 256, **data}),
        "train": _without_unset(
            {"max_steps": 2, "micro_batch_size": 2, "lr": 1e-2, "warmup_ratio": 0.0, **(train or {})}
        ),
        "output_dir": out if out.startswith(("~", "/")) else str(tmp_path / out),
    }


def bundled_gsm8k_data(num_samples: int, **data) -> dict:
    """A `data:` section training on the bundled GSM8K copy (past the 50 rows evaluation reads), instead of the
    default rows file; the tiny tokenizer spends many tokens per problem, hence the long max_seq_len."""
    return {
        "recipe": "gsm8k_bundled_train",
        "path": UNSET,
        "skip_samples": 50,
        "num_samples": num_samples,
        "max_seq_len": 512,
        **data,
    }


def tiny_config(tmp_path: Path, model_dir: Path, out: str = "run", **sections: dict | None) -> Path:
    """`tiny_raw_config` written as tmp_path/<out's name>.yaml; returns its path."""
    path = tmp_path / f"{Path(out).name}.yaml"
    path.write_text(yaml.safe_dump(tiny_raw_config(tmp_path, model_dir, out, **sections)))
    return path


def train_config(tmp_path: Path, model_dir: Path, out: str = "run", **train) -> Path:
    """`tiny_config` with only `train:` keys changed."""
    return tiny_config(tmp_path, model_dir, out, train=train)


def train_cli(config: Path, *args: str | Path):
    """`abba train CONFIG ARGS...` in this process."""
    return cli("train", config, *args)


def reset_accelerate() -> None:
    """Accelerate keeps one AcceleratorState per process and refuses another mixed_precision once it exists (the
    CLI trains once per process): a run in a test process starts from none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def train_in_process(cfg) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """run_training(cfg) from a fresh Accelerate state; its metrics.jsonl rows and its final adapter tensors."""
    from safetensors.torch import load_file

    from abba_cli.run.layout import ADAPTER_WEIGHTS, read_metrics_records
    from abba_cli.train.pipeline import run_training

    reset_accelerate()
    run = run_training(cfg, config_path="test")
    return read_metrics_records(run), load_file(run / ADAPTER_WEIGHTS)


def cli(*args: str | Path):
    """`abba ARGS...` in this process (Typer's CliRunner): the result has exit_code, stdout, stderr, output."""
    from typer.testing import CliRunner

    from abba_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def cli_error_line(result) -> str:
    """The one `error: ...` line a refused command printed (and no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of an `abba` subprocess in a test: offline, its own ABBA_HOME under tmp_path, one OMP thread
    (the same kernels in every run: bitwise comparisons need it), this checkout's abba_cli first on the path (not
    whichever one the venv's editable install points at), plus `extra`."""
    import os

    env = dict(
        os.environ,
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        ABBA_HOME=str(tmp_path / "abba-home"),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return {**env, **extra}
