"""`abba chat`: load the run's model as `abba eval` does (adapter merged in memory), then answer one `--prompt`
or hold a conversation in the terminal: `/reset` clears the history, `/exit` or Ctrl-D leaves, Ctrl-C ends the
answer being generated.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from abba_cli.chat.conversation import Conversation, MessageTooLong, context_length
from abba_cli.chat.generation import PromptInterrupts, Sampling, generate_answer, generation_config
from abba_cli.errors import UserError

PROMPT_FORMATS = ("auto", "chat", "alpaca")
DEFAULT_MAX_NEW_TOKENS = 256
COMMANDS = "/reset clears the history, /exit or Ctrl-D leaves, Ctrl-C ends an answer"


@dataclass
class ChatSession:
    """A loaded model and the conversation held with it."""

    model: Any
    tokenizer: Any
    conversation: Conversation
    gen_cfg: Any
    describe: str  # what is being chatted with, and how, for the banner

    def reply(self, user: str, out: TextIO, err: TextIO) -> str:
        """Answer `user` (streamed to `out`), keep the turn, return the answer."""
        ids, dropped = self.conversation.prompt_ids(user)
        if dropped:
            print(
                f"(dropped the {dropped} oldest turn(s) to fit the model's "
                f"{self.conversation.context_tokens}-token context)",
                file=err,
                flush=True,
            )
        answer, stopped = generate_answer(self.model, self.tokenizer, ids, self.gen_cfg, out)
        out.write("\n")
        out.flush()
        if stopped:
            print("(answer stopped)", file=err, flush=True)
        self.conversation.add(user, answer, dropped)
        return answer


def run_chat(
    run: Path | None = None,
    model: str | None = None,
    base: Path | None = None,
    prompt: str | None = None,
    prompt_format: str = "auto",
    sampling: Sampling | None = None,
    max_new_tokens: int | None = None,
) -> None:
    """`abba chat`: everything that can be refused is refused before the model loads."""
    sampling = sampling or Sampling()
    sampling.check()
    if prompt_format not in PROMPT_FORMATS:
        raise UserError(f"--prompt-format {prompt_format!r}: expected one of {', '.join(PROMPT_FORMATS)}")
    if prompt is not None and not prompt.strip():
        raise UserError("--prompt: empty message; pass the text to answer")
    session = open_session(run, model, base, prompt_format, sampling, max_new_tokens)
    if prompt is not None:
        session.reply(prompt, sys.stdout, sys.stderr)
        return
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    print(f"{session.describe}\n{COMMANDS}", flush=True)
    chat_loop(session, input, sys.stdout, sys.stderr)


def open_session(
    run: Path | None,
    model: str | None,
    base: Path | None,
    prompt_format: str,
    sampling: Sampling,
    max_new_tokens: int | None,
) -> ChatSession:
    """Load the model (the run's adapter merged in memory, as `abba eval` does) and set up the conversation."""
    import torch

    from abba_cli.eval.target import load_model_for_eval, resolve_target

    target = resolve_target(run, model, None, base)
    model_obj, tokenizer, _ = load_model_for_eval(target.model, target.run_dir, target.load_kwargs)
    context = context_length(model_obj, tokenizer)
    if max_new_tokens is None:
        # The run's eval.max_new_tokens when it leaves room for a message, else a default that does.
        configured = target.eval_defaults.max_new_tokens if target.eval_defaults is not None else None
        fits = configured is not None and configured < context
        max_new_tokens = configured if fits else min(DEFAULT_MAX_NEW_TOKENS, context // 2)
    elif max_new_tokens >= context:
        raise UserError(
            f"--max-new-tokens {max_new_tokens}: the model's context is {context} tokens, the message needs "
            "room too; use fewer"
        )
    template = chat_template(target, tokenizer, prompt_format)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    what = str(target.run_dir) if target.run_dir is not None else target.model
    fmt = "the chat template" if template is not None else "the training prompt (Alpaca)"
    describe = f"chatting with {what}: {fmt}, {sampling.describe()}, up to {max_new_tokens} new tokens"
    conversation = Conversation(tokenizer, template, context, max_new_tokens)
    gen_cfg = generation_config(model_obj, tokenizer, sampling, max_new_tokens)
    return ChatSession(model_obj, tokenizer, conversation, gen_cfg, describe)


def chat_template(target, tokenizer, prompt_format: str) -> str | None:
    """The template the conversation renders through (None: the Alpaca training prompt). auto: the run's own
    format; a plain --model: its tokenizer's chat template when it has one."""
    from abba_cli.data.prompts import resolve_chat_template
    from abba_cli.data.training_set import run_chat_template

    if prompt_format == "alpaca":
        return None
    if prompt_format == "chat":
        option = target.train_data.chat_template if target.train_data is not None else None
        return resolve_chat_template(tokenizer, option, target.model)
    if target.train_data is not None:
        return run_chat_template(target.train_data, tokenizer, target.model)
    if target.run_dir is None and getattr(tokenizer, "chat_template", None):
        return resolve_chat_template(tokenizer, None, target.model)
    return None


def chat_loop(session: ChatSession, read_line: Callable[[str], str], out: TextIO, err: TextIO) -> None:
    """Read a message, answer it, repeat, until /exit or end of input; Ctrl-C never ends the loop."""
    with PromptInterrupts().installed() as interrupts:
        _converse(session, interrupts, read_line, out, err)


def _converse(
    session: ChatSession,
    interrupts: PromptInterrupts,
    read_line: Callable[[str], str],
    out: TextIO,
    err: TextIO,
) -> None:
    while True:
        try:
            line = interrupts.read(read_line, ">>> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit to leave)", file=err, flush=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.conversation.reset()
            print("(history cleared)", file=err, flush=True)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}: {COMMANDS}", file=err, flush=True)
            continue
        try:
            session.reply(line, out, err)
        except MessageTooLong as e:
            print(f"error: {e}", file=err, flush=True)
