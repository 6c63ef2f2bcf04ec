"""The row formats users bring besides instruction recipes: chat conversations, plain text, pre-tokenized.

Each row is checked here, before any tokenizer or model is loaded, so `abba validate` finds a bad row as
early as `abba train` does; every problem is one `UserError` naming the file and the row (rows counted from 0,
like the example ids).

    chat       {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    text       {"text": "..."}
    tokenized  {"input_ids": [int, ...], "labels": [int | -100, ...]}   (labels optional: all of input_ids)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from abba_cli.errors import UserError

CHAT_ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ChatExample:
    """One conversation; the loss covers its assistant turns (every turn with train_on_inputs)."""

    id: str
    messages: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class TextExample:
    """Plain text; the loss covers every token."""

    id: str
    text: str


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids prepared elsewhere, used as they are (cut or dropped at data.max_seq_len like the rest)."""

    id: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...] | None


FIELDS = {"chat": "messages", "text": "text", "tokenized": "input_ids"}


def parse_row(fmt: str, row: Any, index: int, name: str, where: str):
    """The example of one row of format `fmt` (chat | text | tokenized); a UserError for a bad row."""
    at = f"{where}, row {index}"
    if not isinstance(row, dict):
        raise UserError(f"{at}: expected an object with {FIELDS[fmt]!r}, got {type(row).__name__}")
    field = FIELDS[fmt]
    if field not in row:
        present = ", ".join(sorted(row)) or "none"
        raise UserError(
            f"{at}: no {field!r} field (fields present: {present}); data.recipe {fmt} reads {field!r}"
        )
    if fmt == "chat":
        return ChatExample(f"{name}-{index}", _messages(row["messages"], at))
    if fmt == "text":
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{at}: 'text' must be a non-empty string, got {_shown(text)}")
        return TextExample(f"{name}-{index}", text)
    ids = _int_list(row["input_ids"], "input_ids", at, allow_ignore=False)
    labels = row.get("labels")
    if labels is not None:
        labels = _int_list(labels, "labels", at, allow_ignore=True)
        if len(labels) != len(ids):
            raise UserError(f"{at}: 'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}")
        if all(x == IGNORE_INDEX for x in labels[1:]):
            raise UserError(f"{at}: every label is {IGNORE_INDEX}: nothing to train on")
    return TokenizedExample(f"{name}-{index}", ids, labels)


def _messages(messages: Any, at: str) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise UserError(
            f"{at}: 'messages' must be a non-empty list of {{role, content}}, got {_shown(messages)}"
        )
    out = []
    for turn, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(
                f"{at}, message {turn}: expected an object with 'role' and 'content', got {_shown(m)}"
            )
        role, content = m["role"], m["content"]
        if role not in CHAT_ROLES:
            raise UserError(f"{at}, message {turn}: unknown role {role!r}; valid: {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise UserError(
                f"{at}, message {turn} ({role}): content must be non-empty text, got {_shown(content)}"
            )
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(
            f"{at}: no assistant turn: nothing to train on (roles: {', '.join(m['role'] for m in out)})"
        )
    return tuple(out)


def _int_list(value: Any, field: str, at: str, allow_ignore: bool) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{at}: {field!r} must be a non-empty list of token ids, got {_shown(value)}")
    for x in value:
        if (
            isinstance(x, bool)
            or not isinstance(x, int)
            or (x < 0 and not (allow_ignore and x == IGNORE_INDEX))
        ):
            valid = f"token ids >= 0 or {IGNORE_INDEX}" if allow_ignore else "token ids >= 0"
            raise UserError(f"{at}: {field!r} holds {x!r}; valid: {valid}")
    return tuple(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
