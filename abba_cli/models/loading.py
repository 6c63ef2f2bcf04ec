"""Loading the frozen base model and its tokenizer.

`load_base` takes a hub id or a local directory, loads safetensors only, and never runs checkpoint code unless
asked. When the hub cannot be reached and the id is a model that ships inside a registry package, the bundled
copy (models/bundled.py) is used instead, with a note on stderr.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abba_cli.errors import UserError
from abba_cli.models.bundled import SMOLLM2_ID, bundled_stand_in
from abba_cli.util.hub import use_hub

if TYPE_CHECKING:
    from abba_cli.config import ModelConfig

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(name: str) -> bool:
    # A hub id is "org/name" or "name"; anything else (./x, /x, ~/x, a/b/c) can only be a local directory.
    return not _HUB_ID.match(name)


def _hub_unreachable(err: Exception) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return True
    text = str(err)
    return "couldn't connect" in text or "offline mode" in text.lower() or "cached files" in text


def load_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    """`load_base`'s keyword arguments from a run config's `model:` section: the one place they are built, so
    train, eval and merge load a base the same way (revision included)."""
    return dict(
        dtype=model_cfg.dtype,
        trust_remote_code=model_cfg.trust_remote_code,
        revision=model_cfg.revision,
        attn_implementation=model_cfg.attn_implementation,
        quantization=model_cfg.quantization,
        double_quant=model_cfg.double_quant,
    )


def load_configured_base(model_cfg: ModelConfig, empty_weights: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) as a run config's `model:` section describes them."""
    return load_base(model_cfg.name_or_path, **load_kwargs(model_cfg), empty_weights=empty_weights)


def load_base(
    name_or_path: str,
    dtype: str = "auto",
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
    empty_weights: bool = False,
    quantization: str = "none",
    double_quant: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a hub id or local directory; the tokenizer always has a pad token.

    `empty_weights=True` builds the model from its config on the meta device (no weights read or downloaded):
    enough to count parameters or plan adapters for a 9B model on a laptop. `quantization` (nf4, fp4, int8)
    loads the linear layers packed by bitsandbytes on the device transformers picks (abba_cli.models.quantization).
    """
    if dtype != "auto" and dtype not in _DTYPES:
        raise UserError(f"model.dtype {dtype!r}: expected one of auto, {', '.join(_DTYPES)}")
    check_attention_available(attn_implementation)
    if quantization != "none":
        from abba_cli.models.quantization import check_quantization

        check_quantization(quantization, dtype, double_quant)  # before any weights load
    where = _locate(name_or_path, trust_remote_code, revision, check_weights=not empty_weights)
    tokenizer = _tokenizer_or_bundled(where)
    model = _load_model(where, dtype, attn_implementation, empty_weights, quantization, double_quant)
    if where.bundled:
        # Keep the user's name in the config so run directories and adapter configs name the real model.
        model.config._name_or_path = name_or_path
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@dataclass
class _Location:
    """Where a base loads from: a local folder or a hub id (with the hub's loading arguments), or the bundled
    stand-in once the hub proved unreachable."""

    name: str  # as the user wrote it
    location: str
    is_dir: bool
    kwargs: dict[str, Any]  # trust_remote_code, and for the hub revision / local_files_only
    bundled: bool = False


def _locate(
    name_or_path: str, trust_remote_code: bool, revision: str | None, check_weights: bool
) -> _Location:
    source = Path(name_or_path).expanduser()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.is_dir():
        check_model_dir(source, name_or_path, weights=check_weights)
        return _Location(name_or_path, str(source), True, kwargs)
    if source.exists() or _looks_like_path(name_or_path):
        raise UserError(f"model.name_or_path {name_or_path!r}: no such model directory")
    if not use_hub():
        # Hub cache only, said explicitly: huggingface_hub reads HF_HUB_OFFLINE once at import, so a variable
        # set later would be ignored; and an unreachable hub then fails at once instead of after its retries.
        kwargs["local_files_only"] = True
    if revision is not None:
        kwargs["revision"] = revision
    return _Location(name_or_path, name_or_path, False, kwargs)


def _tokenizer_or_bundled(where: _Location) -> Any:
    """The tokenizer; a hub id the hub cannot serve switches `where` to its bundled stand-in, if one ships."""
    name = where.name
    try:
        return _load_tokenizer(where.location, where.kwargs)
    except OSError as err:
        if where.is_dir:
            raise UserError(f"model.name_or_path {name!r}: cannot load a tokenizer from it ({err})") from None
        if not _hub_unreachable(err):
            raise UserError(
                f"model.name_or_path {name!r}: not a model on the hub ({_first_line(err)})"
            ) from None
        fallback = bundled_stand_in(name, "the hub is unreachable")
        if fallback is None:
            raise UserError(
                f"model.name_or_path {name!r}: no such local directory, the hub is unreachable and the model "
                f"is not in the hub cache; download it first, pass a local directory, or use {SMOLLM2_ID} (bundled)"
            ) from None
    where.location, where.bundled = str(fallback), True
    where.kwargs.pop("revision", None)
    where.kwargs.pop("local_files_only", None)
    return _load_tokenizer(where.location, where.kwargs)


def _load_model(
    where: _Location,
    dtype: str,
    attn_implementation: str | None,
    empty_weights: bool,
    quantization: str,
    double_quant: bool,
) -> Any:
    """The model from `where`, its loading errors turned into one line naming model.name_or_path."""
    from safetensors import SafetensorError

    name = where.name
    try:
        if empty_weights:
            return _empty_model(where, dtype, quantization, double_quant)
        from transformers import AutoModelForCausalLM

        from abba_cli.models.quantization import from_pretrained_kwargs

        model_kwargs = dict(where.kwargs, use_safetensors=True, dtype=dtype)
        # The bundled SmolLM2 is an ordinary bf16 folder by now (converted from its GGUF), so it quantizes on load.
        model_kwargs.update(from_pretrained_kwargs(quantization, dtype, double_quant))
        if attn_implementation is not None:
            model_kwargs["attn_implementation"] = attn_implementation
        return AutoModelForCausalLM.from_pretrained(where.location, **model_kwargs)
    except OSError as err:
        raise UserError(
            f"model.name_or_path {name!r}: cannot load safetensors weights ({_first_line(err)})"
        ) from None
    except SafetensorError as err:
        # A hub-cache download cut short (local folders are checked file by file before this).
        raise UserError(
            f"model.name_or_path {name!r}: a weights file is truncated or corrupt ({err}); download it again"
        ) from None
    except ValueError as err:
        if "attn_implementation" in str(err):
            raise UserError(
                f"model.attn_implementation {attn_implementation!r}: this model does not support it "
                "(use sdpa, the default, or eager)"
            ) from None
        raise UserError(f"model.name_or_path {name!r}: {_first_line(err)}") from None


def _empty_model(where: _Location, dtype: str, quantization: str, double_quant: bool) -> Any:
    """The model built from its config on the meta device: no weights read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from abba_cli.models.quantization import quantize_empty_model

    config = AutoConfig.from_pretrained(where.location, **where.kwargs)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=where.kwargs["trust_remote_code"])
    # from_config leaves tie_word_embeddings models untied (from_pretrained ties them): tie, so the
    # skeleton has the loaded model's parameters (FSDP2 maps them by name; validate counts them).
    model.tie_weights()
    if quantization != "none":
        quantize_empty_model(model, quantization, dtype, double_quant)
    return model


# attn_implementation -> (transformers' own availability check, what it needs)
_ATTENTION_NEEDS = {
    "flash_attention_2": (
        "is_flash_attn_2_available",
        "the flash-attn package (2.3.3 or newer) and a CUDA GPU",
    ),
    "flash_attention_3": ("is_flash_attn_3_available", "the flash-attn-3 package and a CUDA GPU"),
    "flash_attention_4": ("is_flash_attn_4_available", "the flash-attn-4 package and a CUDA GPU"),
    "flex_attention": ("is_torch_flex_attn_available", "a torch with flex_attention, not on TPU"),
}


def check_attention_available(attn_implementation: str | None) -> None:
    """UserError, before any weights load, when the chosen attention backend cannot run on this machine."""
    if attn_implementation not in _ATTENTION_NEEDS:
        return  # None, eager, sdpa: always there (other values are refused by the config schema)
    import transformers.utils

    check, needs = _ATTENTION_NEEDS[attn_implementation]
    if not getattr(transformers.utils, check)():
        raise UserError(
            f"model.attn_implementation {attn_implementation!r} cannot run here: it needs {needs} "
            f"(transformers.utils.{check}() is False); install that, or use sdpa (the default) or eager"
        )


def check_model_dir(path: Path, name: str, weights: bool = True) -> None:
    """A local model folder's config.json parses and (with `weights`) every *.safetensors header is whole.

    Checked before anything loads so the message names the broken file: transformers reports a bad config.json
    as a tokenizer problem, and safetensors' own error does not say which shard is truncated.
    """
    from abba_cli.util.yaml_file import read_utf8

    config = path / "config.json"
    if not config.is_file():
        raise UserError(
            f"model.name_or_path {name!r}: {config} is missing; a model folder holds config.json, "
            "tokenizer files and *.safetensors (save_pretrained writes them)"
        )
    try:
        parsed = json.loads(read_utf8(config))
    except json.JSONDecodeError as e:
        raise UserError(
            f"model.name_or_path {name!r}: {config} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    if not isinstance(parsed, dict):
        raise UserError(f"model.name_or_path {name!r}: {config} must hold a JSON object of model settings")
    if weights:
        from safetensors import SafetensorError, safe_open

        for shard in sorted(path.glob("*.safetensors")):
            try:
                with safe_open(shard, framework="pt"):
                    pass  # opening parses the header and checks the file covers every tensor it lists
            except SafetensorError as e:
                raise UserError(
                    f"model.name_or_path {name!r}: {shard} is truncated or corrupt ({e}); "
                    "download or save the model again"
                ) from None


def _load_tokenizer(location: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location, **kwargs)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
