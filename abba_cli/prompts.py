"""The one prompt template, shared by training and evaluation.

The references drift here (the released ABBA training prompt is indented by 12 spaces, its eval prompt is
not), so both `data` and `evaluate` call `render_prompt` and nothing else builds prompts.
Template: the Alpaca format used by LLM-Adapters and the ABBA paper.
"""

from __future__ import annotations

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_prompt(instruction: str, input: str | None = None) -> str:
    """Everything the model sees before its response; the response follows directly."""
    if input:
        return _WITH_INPUT.format(instruction=instruction.strip(), input=input.strip())
    return _NO_INPUT.format(instruction=instruction.strip())
