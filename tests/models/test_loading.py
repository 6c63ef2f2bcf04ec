"""models.load_base: local dirs, pad tokens, errors, and the real offline fallback to the bundled SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

from abba_cli.errors import UserError
from abba_cli.models.bundled import SMOLLM2_ID, bundled_smollm2_dir
from abba_cli.models.loading import load_base


def _spy_tokenizer_load(monkeypatch) -> dict:
    """Record the kwargs AutoTokenizer.from_pretrained gets, then let the real one run (and raise whatever
    transformers/huggingface_hub really raise for a model that is neither local nor in the hub cache)."""
    import transformers

    seen: dict = {}
    real = transformers.AutoTokenizer.from_pretrained

    def spy(name, **kwargs):
        seen.update(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    return seen


def test_local_dir_loads_with_dtype(tiny_model_dir):
    model, tok = load_base(str(tiny_model_dir), "bfloat16")
    assert model.dtype == torch.bfloat16
    assert tok.pad_token == "<|pad|>"
    assert not any(p.device.type == "meta" for p in model.parameters())


def test_pad_token_defaults_to_eos(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    d = tmp_path / "nopad"
    tok.save_pretrained(d)
    for name in ("config.json", "model.safetensors"):
        (d / name).write_bytes((tiny_model_dir / name).read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg["pad_token_id"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    model, tok = load_base(str(d))
    assert tok.pad_token == tok.eos_token
    assert model.config.pad_token_id == tok.pad_token_id


def test_safetensors_only(tiny_model_dir, tmp_path):
    """A pickle-only checkpoint is refused (use_safetensors=True): pickles can run code."""
    from transformers import AutoModelForCausalLM

    d = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    d.mkdir()
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(UserError, match="safetensors"):
        load_base(str(d))


@pytest.mark.parametrize("name", ["./no/such/dir", "/definitely/missing/model", "a/b/c"])
def test_missing_local_path_is_user_error(name):
    with pytest.raises(UserError, match="no such model directory"):
        load_base(name)


def test_unknown_hub_id_offline_is_user_error():
    with pytest.raises(UserError, match="hub is unreachable"):
        load_base("nobody-here/not-a-model-xyz")


def test_bad_dtype_is_user_error(tiny_model_dir):
    with pytest.raises(UserError, match="model.dtype"):
        load_base(str(tiny_model_dir), "float8")


@pytest.mark.slow
def test_bundled_conversion_is_a_normal_hf_folder(smollm2_dir):
    from transformers import AutoConfig

    assert smollm2_dir == bundled_smollm2_dir()  # cached: the second call does not convert again
    assert (smollm2_dir / "model.safetensors").is_file()
    assert (smollm2_dir / "tokenizer.json").is_file()
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert "quantization_config" not in config.to_dict()
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)


@pytest.mark.slow
def test_hub_id_falls_back_to_bundled_copy_offline(smollm2_dir, capsys):
    model, tok = load_base(SMOLLM2_ID, "float32")
    err = capsys.readouterr().err
    assert "bundled copy" in err and "4-bit" in err
    assert model.config._name_or_path == SMOLLM2_ID
    assert model.dtype == torch.float32
    assert tok.pad_token is not None
    # The dequantized weights are a working language model: it continues an obvious sequence.
    ids = tok("1, 2, 3, 4, 5,", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "6" in tok.decode(out[0, ids["input_ids"].shape[1] :])


def test_unreachable_hub_is_detected_without_retries(monkeypatch):
    """Offline without HF_HUB_OFFLINE: a quick probe switches to the hub cache, no network retries."""
    import socket

    from abba_cli.util import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    assert hub.hub_reachable() is False
    seen = _spy_tokenizer_load(monkeypatch)
    with pytest.raises(UserError, match="hub is unreachable"):
        load_base("nobody-here/not-a-model-xyz")
    assert seen.get("local_files_only") is True


def test_hf_hub_offline_means_hub_cache_only_even_if_set_after_import(monkeypatch):
    """HF_HUB_OFFLINE set after huggingface_hub was imported must still keep load_base off the network."""
    import socket

    def no_probe(*args, **kwargs):
        raise AssertionError("no network probe when HF_HUB_OFFLINE is set")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", no_probe)
    seen = _spy_tokenizer_load(monkeypatch)
    with pytest.raises(UserError, match="hub is unreachable"):
        load_base("nobody-here/not-a-model-xyz")
    assert seen.get("local_files_only") is True


# ----------------------------------------------------------------------------------- broken model folders


def _copy_model(src, dst, **save):
    """A copy of the tiny model folder; `save` re-saves the weights (e.g. max_shard_size) instead of copying."""
    import shutil

    shutil.copytree(src, dst)
    if save:
        from transformers import AutoModelForCausalLM

        for f in dst.glob("*.safetensors"):
            f.unlink()
        AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, **save)
    return dst


def test_truncated_weights_name_the_broken_shard(tiny_model_dir, tmp_path):
    d = _copy_model(tiny_model_dir, tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 2
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        load_base(str(d))
    msg = str(err.value)
    assert f"{shards[1]} is truncated or corrupt" in msg and str(shards[0]) not in msg
    assert "\n" not in msg


def test_garbage_weights_file_is_user_error(tiny_model_dir, tmp_path):
    d = _copy_model(tiny_model_dir, tmp_path / "garbage")
    (d / "model.safetensors").write_bytes(b"\x00not safetensors" * 8)
    with pytest.raises(UserError, match=r"model\.safetensors is truncated or corrupt"):
        load_base(str(d))


@pytest.mark.parametrize(
    "content,expected",
    [
        (
            b'{"model_type": "llama",\n  "hidden_size": 64,,\n}',
            r"config\.json is not valid JSON \(line 2, column 21",
        ),
        (b'{"model_type": "ll\xe9ma"}', r"config\.json: line 1: byte 0xe9 is not UTF-8"),
        (b"[1, 2]", r"config\.json must hold a JSON object"),
    ],
    ids=["bad-json", "not-utf8", "not-an-object"],
)
def test_broken_config_json_is_named(tiny_model_dir, tmp_path, content, expected):
    d = _copy_model(tiny_model_dir, tmp_path / "broken")
    (d / "config.json").write_bytes(content)
    with pytest.raises(UserError, match=expected):
        load_base(str(d))
    with pytest.raises(UserError, match=expected):
        load_base(str(d), empty_weights=True)  # `abba validate` reads config.json too


def test_missing_config_json_is_named(tiny_model_dir, tmp_path):
    d = _copy_model(tiny_model_dir, tmp_path / "noconfig")
    (d / "config.json").unlink()
    with pytest.raises(UserError, match=r"config\.json is missing"):
        load_base(str(d))


# ----------------------------------------------------------------------------------- attention backends


def test_attn_implementation_reaches_the_model(tiny_model_dir):
    """Real loads: the config's attn_implementation is the one the model runs (default sdpa)."""
    model, _ = load_base(str(tiny_model_dir), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    model, _ = load_base(str(tiny_model_dir))
    assert model.config._attn_implementation == "sdpa"


def _flash_attn_2_available() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


@pytest.mark.skipif(_flash_attn_2_available(), reason="flash-attn is installed and usable here")
def test_flash_attention_without_the_package_is_one_line_before_loading(tiny_model_dir, monkeypatch):
    import transformers

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model must not load when its attention backend cannot run")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", must_not_load)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    with pytest.raises(UserError) as err:
        load_base(str(tiny_model_dir), attn_implementation="flash_attention_2")
    msg = str(err.value)
    assert msg.startswith("model.attn_implementation 'flash_attention_2' cannot run here")
    assert "is_flash_attn_2_available() is False" in msg and "sdpa" in msg


def test_revision_and_attn_implementation_reach_from_pretrained(tiny_model_dir, tmp_path, monkeypatch):
    """`abba train --dry-run` on a hub id: model.revision and model.attn_implementation from the config are
    what the tokenizer and model loaders get (the hub is replaced by the tiny local folder)."""
    import transformers
    import yaml
    from helpers import cli

    real_tok, real_model = (
        transformers.AutoTokenizer.from_pretrained,
        transformers.AutoModelForCausalLM.from_pretrained,
    )
    calls: dict[str, tuple] = {}

    def fake_tokenizer(name, **kwargs):
        calls["tokenizer"] = (name, kwargs)
        return real_tok(tiny_model_dir)

    def fake_model(name, **kwargs):
        calls["model"] = (name, kwargs)
        return real_model(tiny_model_dir, attn_implementation=kwargs["attn_implementation"])

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2\n#### 2"}) + "\n")
    cfg = tmp_path / "cfg.yaml"
    raw = {
        "model": {"name_or_path": "some-org/tiny", "revision": "v1.2", "attn_implementation": "eager"},
        "adapter": {"r1": 2, "r2": 2, "target_modules": ["q_proj"]},
        "data": {"recipe": "gsm8k", "path": str(data), "max_seq_len": 64},
        "output_dir": str(tmp_path / "out"),
    }
    cfg.write_text(yaml.safe_dump(raw))
    result = cli(*["train", str(cfg), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert calls["tokenizer"][0] == calls["model"][0] == "some-org/tiny"
    assert calls["tokenizer"][1]["revision"] == calls["model"][1]["revision"] == "v1.2"
    assert calls["model"][1]["attn_implementation"] == "eager"
