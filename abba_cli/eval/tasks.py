"""Evaluation tasks and how each is asked: task names and groups, the protocol (ours or the paper's), the prompt,
and which examples a --limit/--skip run takes.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from abba_cli.data.prompts import render_prompt
from abba_cli.errors import UserError

COMMONSENSE_TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")
TASK_GROUPS = {"commonsense": COMMONSENSE_TASKS}
PROTOCOLS = ("ours", "paper")
# `--limit` on a recipe with generation.limit_order "shuffled" (MATH) takes the first N of this fixed shuffle,
# so limited runs are identical across calls and a larger --limit extends a smaller one.
LIMIT_SHUFFLE_SEED = 1234


def valid_tasks() -> list[str]:
    from abba_cli.data.recipes import available_recipes

    return sorted(available_recipes(kind="eval")) + sorted(TASK_GROUPS)


def resolve_tasks(requested: Sequence[str]) -> list[str]:
    """Expand groups (commonsense), drop repeats keeping order; UserError on an unknown name."""
    from abba_cli.data.recipes import available_recipes

    known = set(available_recipes(kind="eval"))
    tasks: list[str] = []
    for name in requested:
        name = name.strip().lower()
        expanded = TASK_GROUPS.get(name, (name,))
        for task in expanded:
            if task not in known:
                raise UserError(f"--task {name!r}: unknown task; valid: {', '.join(valid_tasks())}")
            if task not in tasks:
                tasks.append(task)
    return tasks


def answer_spec(recipe) -> tuple[str, list[str]]:
    answer = recipe.answer
    if answer is None:
        raise UserError(f"recipe {recipe.name!r} has no answer section; only eval recipes can be evaluated")
    return answer.type, list(answer.labels or [])


@dataclass(frozen=True)
class TaskProtocol:
    """How one task is prompted and decoded: ours (train = eval prompt) or the paper's reference scripts'."""

    name: str
    response_prefix: str
    max_new_tokens: int
    stop: list[str]


def task_protocol(recipe, protocol: str, max_new_tokens: int | None = None) -> TaskProtocol:
    """The recipe's own generation settings (`ours`) or its `generation.paper` ones; --max-new-tokens wins."""
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    gen = recipe.generation
    if protocol == "paper" and gen.paper is not None:
        p = gen.paper
        return TaskProtocol("paper", p.response_prefix, max_new_tokens or p.max_new_tokens, list(p.stop))
    # Tasks without a `paper` entry (commonsense) run as the references do already: no prefix, same budget.
    return TaskProtocol(protocol, "", max_new_tokens or gen.max_new_tokens, list(gen.stop or []))


def build_prompt(
    instruction: str, input: str | None, protocol: TaskProtocol, render: Callable = render_prompt
) -> str:
    """render_prompt (or a chat-trained run's renderer), plus the protocol's response prefix written as the
    references write it ("### Response: Let's think step by step.", on the header's line)."""
    prompt = render(instruction, input)
    if not protocol.response_prefix:
        return prompt
    if prompt.endswith("### Response:\n"):
        return prompt[:-1] + " " + protocol.response_prefix
    return prompt + protocol.response_prefix


def select_examples(recipe, skip: int = 0, limit: int | None = None):
    """(examples, SourceInfo with the count and hash of those examples).

    `limit` keeps the first N after `skip` in source order, or, for a recipe whose generation.limit_order is
    "shuffled" (MATH: subjects one after another), the first N of a fixed seeded shuffle (in source order),
    so that a limited run covers every subject and is the same on every call.
    """
    from abba_cli.data.recipes import load_examples

    if limit is not None and recipe.generation.limit_order == "shuffled":
        examples, source = load_examples(recipe, skip=skip, with_source=True)
        order = list(range(len(examples)))
        random.Random(LIMIT_SHUFFLE_SEED).shuffle(order)
        examples = [examples[i] for i in sorted(order[:limit])]
    else:
        examples, source = load_examples(recipe, skip=skip, limit=limit, with_source=True)
    if limit is not None and len(examples) < limit:
        print(
            f"{recipe.name}: --limit {limit} but only {len(examples)} examples after --skip {skip} "
            f"(the copy has {source.rows}); evaluating n={len(examples)}",
            file=sys.stderr,
        )
    return examples, source.with_examples(examples)
