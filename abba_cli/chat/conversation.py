"""A conversation's turns and how they become the model's input: the run's chat template for chat-trained runs,
the training (Alpaca) prompt otherwise, with the oldest turns dropped to stay within the model's context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from abba_cli.data.prompts import conversation_prompt, render_prompt
from abba_cli.errors import UserError

# Tokenizers that know no limit report a huge sentinel (int(1e30)) as model_max_length.
_NO_LIMIT = 10**7
_FALLBACK_CONTEXT = 2048


class MessageTooLong(UserError):
    """The message alone (with room for the answer) does not fit the model's context."""


@dataclass
class Turn:
    user: str
    answer: str


@dataclass
class Conversation:
    """The turns so far. `chat_template` None means the Alpaca training prompt: each earlier turn is written as
    it trained (prompt, answer, EOS), then the new prompt."""

    tokenizer: object
    chat_template: str | None
    context_tokens: int
    max_new_tokens: int
    turns: list[Turn] = field(default_factory=list)

    def render(self, user: str, turns: list[Turn]) -> str:
        """The text the model sees before answering `user` after `turns`."""
        if self.chat_template is not None:
            messages = []
            for t in turns:
                messages += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.answer}]
            messages.append({"role": "user", "content": user})
            return conversation_prompt(self.tokenizer, self.chat_template, messages)
        eos = getattr(self.tokenizer, "eos_token", None) or "\n\n"
        return "".join(render_prompt(t.user) + t.answer + eos for t in turns) + render_prompt(user)

    def prompt_ids(self, user: str) -> tuple[list[int], int]:
        """(token ids of the prompt for `user`, how many of the oldest turns were dropped to fit the context)."""
        budget = self.context_tokens - self.max_new_tokens
        for dropped in range(len(self.turns) + 1):
            ids = self.tokenizer(self.render(user, self.turns[dropped:]))["input_ids"]
            if len(ids) <= budget:
                return ids, dropped
        raise MessageTooLong(
            f"the message is {len(ids)} tokens; with --max-new-tokens {self.max_new_tokens} the model's context "
            f"of {self.context_tokens} tokens leaves room for {budget}"
        )

    def add(self, user: str, answer: str, dropped: int = 0) -> None:
        """Record a finished turn, forgetting the turns that no longer fit."""
        del self.turns[:dropped]
        self.turns.append(Turn(user, answer))

    def reset(self) -> None:
        self.turns.clear()


def context_length(model, tokenizer) -> int:
    """Tokens the model attends over: its position limit, or the tokenizer's if smaller."""
    limits = [getattr(model.config, "max_position_embeddings", None)]
    limits.append(tokenizer.model_max_length if tokenizer.model_max_length < _NO_LIMIT else None)
    known = [int(n) for n in limits if n]
    return min(known) if known else _FALLBACK_CONTEXT
