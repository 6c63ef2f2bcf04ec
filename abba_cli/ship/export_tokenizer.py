"""The tokenizer and prompt format written beside an exported adapter, so a server that loads the folder
(PEFT, vLLM, TGI: they read the adapter folder's tokenizer and chat template) prompts as training did.

A chat-trained run ships the chat template it trained with (data.chat_template or the base tokenizer's). A run
trained on Alpaca prompts (`data.prompts.render_prompt`) has no chat template of its own: serving it through the
base tokenizer's template is exactly the train/serve mismatch users hit. So its export carries a chat template
that renders one user turn as the input-free Alpaca prompt, byte for byte (the variant with an `### Input:`
section has no place in a chat message), and `abba_prompt_format.json` says which format it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abba_cli.data.prompts import render_prompt
from abba_cli.errors import UserError

PROMPT_FORMAT_FILE = "abba_prompt_format.json"
# A marker no instruction contains: render_prompt splits around it into the text before and after the instruction.
_SLOT = "\x00instruction\x00"


def alpaca_chat_template(bos_token: str | None = None) -> str:
    """A Jinja chat template whose rendering of one user message is `render_prompt(message)`.

    Jinja's `trim` is Python's str.strip, as render_prompt's. Later turns repeat the prompt after the previous
    answer and EOS (training saw one turn; this is the natural continuation, not a trained format). `bos_token`:
    the text of a BOS the tokenizer adds when encoding, since servers tokenize a rendered template without adding
    special tokens.
    """
    before, after = render_prompt(_SLOT).split(_SLOT)
    for part in (before, after):
        if any(tag in part for tag in ("{{", "{%", "{#")):
            raise RuntimeError(
                "the Alpaca prompt holds Jinja syntax; it cannot be written as a chat template"
            )
    start = "{{ bos_token }}" if bos_token else ""
    return (
        start + "{% for message in messages %}"
        "{% if message['role'] == 'user' %}" + before + "{{ message['content'] | trim }}" + after + ""
        "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
        "{% else %}{{ raise_exception('this model was trained on Alpaca prompts: only user and assistant "
        "messages have a place in them') }}"
        "{% endif %}{% endfor %}"
    )


def _adds_bos(tokenizer: Any) -> bool:
    """The tokenizer puts a BOS in front of what it encodes (the training prompt then began with it)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


@dataclass
class ServedFormat:
    """The tokenizer to write beside an export, with the chat template set to the run's format."""

    tokenizer: Any
    kind: str  # "chat_template": the run's own; "alpaca": the Alpaca prompt as a chat template

    def save(self, out: Path) -> None:
        from abba_cli.util.files import atomic_write_json

        self.tokenizer.save_pretrained(out)
        atomic_write_json(out / PROMPT_FORMAT_FILE, self.record())

    def record(self) -> dict[str, Any]:
        if self.kind == "alpaca":
            before, after = render_prompt(_SLOT).split(_SLOT)
            how = "the Alpaca prompt the run trained on, as the tokenizer's chat template (one user turn)"
            return {
                "format": "alpaca",
                "description": how,
                "prompt": before + "{instruction}" + after,
                "prompt_with_input": render_prompt(
                    "{instruction}", "{input}"
                ),  # not expressible as a chat turn
            }
        return {"format": "chat_template", "description": "the chat template the run trained with"}

    def describe(self) -> str:
        if self.kind == "alpaca":
            return "the tokenizer with the run's Alpaca prompt as its chat template"
        return "the tokenizer with the chat template the run trained with"


def served_format(run_dir: Path, base: str) -> ServedFormat:
    """The base's tokenizer (read as training read it) carrying the run's prompt format; UserError when the base's
    tokenizer cannot be read (an export without it would be served in the base's format, not the trained one)."""
    from abba_cli.data.training_set import run_dir_chat_template
    from abba_cli.models.loading import load_base
    from abba_cli.ship.run_base import run_load_settings

    if not base:
        raise UserError(
            f"{run_dir}: adapter_config.json names no base model, so its tokenizer cannot be exported; "
            "pass --base PATH"
        )
    try:
        _, tokenizer = load_base(base, empty_weights=True, **run_load_settings(run_dir))
    except (UserError, OSError, ValueError) as err:  # transformers: ValueError for a folder without tokenizer
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot export the run's tokenizer from base model {base!r}: {first}; pass --base PATH (a copy of the base)"
        ) from None
    template = run_dir_chat_template(run_dir, tokenizer, base)
    kind = "chat_template"
    if template is None:
        kind = "alpaca"
        template = alpaca_chat_template(tokenizer.bos_token if _adds_bos(tokenizer) else None)
    tokenizer.chat_template = template
    return ServedFormat(tokenizer=tokenizer, kind=kind)
