"""The one place prompts are rendered, shared by training and evaluation.

The references drift here (the released ABBA training prompt is indented by 12 spaces, its eval prompt is
not), so both `data` and `evaluate` call these functions and nothing else builds prompts.
Instruction recipes: the Alpaca format used by LLM-Adapters and the ABBA paper (`render_prompt`). Runs trained
on chat data: the tokenizer's (or data.chat_template's) chat template (`render_chat`, `chat_prompt`);
`prompt_renderer` picks the one a run trained with.
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


# ------------------------------------------------------------------------------------------------- chat
# Runs trained on `data.recipe: chat` render through the tokenizer's chat template instead, in training and in
# evaluation alike (`prompt_renderer`), so train = eval holds for them too.

_TEMPLATE_SUFFIXES = (".jinja", ".j2", ".jinja2", ".txt")


def resolve_chat_template(tokenizer, option: str | None, model_name: str = "the model") -> str:
    """The Jinja chat template to use: data.chat_template (a file path or inline text), else the tokenizer's."""
    from pathlib import Path

    from abba_cli.errors import UserError

    if option is not None:
        path = Path(option).expanduser()
        if "{{" in option or "{%" in option:
            return option
        if not path.is_file():
            raise UserError(
                f"data.chat_template {option!r}: no such file, and not an inline Jinja template "
                "(inline text holds {{ ... }} or {% ... %})"
            )
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"data.chat_template {option}: not UTF-8 text") from None
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is what chat models use
        template = template.get("default")
    if not template:
        raise UserError(
            f"the tokenizer of {model_name} has no chat template; pass one with data.chat_template: PATH "
            f"(a {'/'.join(_TEMPLATE_SUFFIXES[:2])} file) or an inline Jinja string, e.g. --set "
            "data.chat_template=template.jinja"
        )
    return template


def render_chat(tokenizer, messages, template: str, add_generation_prompt: bool = False) -> str:
    """The conversation as the template writes it (text, special tokens included as text)."""
    from abba_cli.errors import UserError

    try:
        return tokenizer.apply_chat_template(
            list(messages),
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as e:  # noqa: BLE001 - jinja2 raises many kinds (TemplateError, TypeError, ...)
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(
            f"the chat template failed to render a conversation: {type(e).__name__}: {first}"
        ) from None


def user_message(instruction: str, input: str | None = None) -> str:
    """An instruction recipe's example as the content of one user turn."""
    return instruction.strip() + (f"\n\n{input.strip()}" if input else "")


def chat_prompt(tokenizer, template: str, instruction: str, input: str | None = None) -> str:
    """Everything a chat-trained model sees before its answer: one user turn and the assistant header."""
    return conversation_prompt(
        tokenizer, template, [{"role": "user", "content": user_message(instruction, input)}]
    )


def conversation_prompt(tokenizer, template: str, messages) -> str:
    """A conversation ending in a user turn, rendered up to the assistant header (`abba chat`'s turns).

    Training encodes rendered conversations without adding special tokens (the template writes them); a
    tokenizer that adds a BOS by itself would add a second one to this text, so a leading BOS is left to it.
    """
    text = render_chat(tokenizer, messages, template, True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        probe = tokenizer("a")["input_ids"]
        if probe and probe[0] == tokenizer.bos_token_id:
            text = text[len(bos) :]
    return text


def prompt_renderer(tokenizer, chat_template: str | None):
    """`render(instruction, input) -> prompt`: the Alpaca prompt, or the chat template when a run trained on
    chat data (`chat_template` from `abba_cli.data.run_chat_template`)."""
    if chat_template is None:
        return render_prompt
    return lambda instruction, input=None: chat_prompt(tokenizer, chat_template, instruction, input)
