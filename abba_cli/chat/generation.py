"""One answer of `abba chat`: decoding settings (greedy unless a temperature is given), tokens printed as they
are generated, and Ctrl-C ending the answer (not the program) through a stopping criterion.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from abba_cli.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """Decoding settings: temperature 0 is greedy decoding (the default, as `abba eval` decodes)."""

    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def check(self) -> None:
        """UserError (one line) for settings that contradict each other or are out of range."""
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature}: expected 0 (greedy) or a positive number")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p}: expected a number in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k {self.top_k}: expected a positive number of tokens")
        if self.temperature == 0 and (self.top_p is not None or self.top_k is not None):
            given = "--top-p" if self.top_p is not None else "--top-k"
            raise UserError(
                f"{given} applies to sampling, and --temperature 0 (the default) decodes greedily; "
                "add --temperature T (e.g. 0.7) to sample"
            )

    def describe(self) -> str:
        if self.temperature == 0:
            return "greedy"
        parts = [f"temperature {self.temperature:g}"]
        parts += [f"top-p {self.top_p:g}"] if self.top_p is not None else []
        parts += [f"top-k {self.top_k}"] if self.top_k is not None else []
        parts += [f"seed {self.seed}"] if self.seed is not None else []
        return "sampling, " + ", ".join(parts)


def generation_config(model, tokenizer, sampling: Sampling, max_new_tokens: int):
    """eval's fully specified greedy config (nothing inherited from the checkpoint), sampling when asked."""
    from abba_cli.eval.generate import greedy_generation_config

    gen = greedy_generation_config(model, tokenizer, max_new_tokens, stop=())
    if sampling.temperature > 0:
        gen.do_sample = True
        gen.temperature = sampling.temperature
        gen.top_p = 1.0 if sampling.top_p is None else sampling.top_p
        gen.top_k = 0 if sampling.top_k is None else sampling.top_k  # 0: no top-k filter
    return gen


def stop_flag():
    """A StoppingCriteria that ends generation once its `requested` is set (by the Ctrl-C handler)."""
    import torch
    from transformers import StoppingCriteria

    class StopOnRequest(StoppingCriteria):
        requested = False

        def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
            return torch.full(
                (input_ids.shape[0],), self.requested, dtype=torch.bool, device=input_ids.device
            )

    return StopOnRequest()


class PromptInterrupts:
    """SIGINT for a whole conversation: at the prompt it raises KeyboardInterrupt, which input() needs to abandon
    the line being typed; anywhere else between answers (an answer that just ended, the history being trimmed)
    it is ignored, so a Ctrl-C that lands as an answer ends, or a second one while the first is reported, never
    ends the chat. Answers install their own handler (ctrl_c_ends_answer) and restore this one."""

    def __init__(self) -> None:
        self.at_prompt = False

    def handle(self, signum, frame) -> None:
        if self.at_prompt:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[PromptInterrupts]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self.handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def read(self, read_line: Callable[[str], str], prompt: str) -> str:
        """read_line(prompt), interruptible by Ctrl-C. CPython's readline acts on a SIGINT only when it interrupts
        the wait for a key: one that arrives after the prompt is drawn but before that wait begins is handled
        when the line is entered, and then abandons that line (KeyboardInterrupt here, as for any Ctrl-C)."""
        self.at_prompt = True
        try:
            return read_line(prompt)
        finally:
            self.at_prompt = False


@contextmanager
def ctrl_c_ends_answer(flag) -> Iterator[None]:
    """While an answer is generated, SIGINT sets `flag.requested`: the answer ends after its current token and
    the conversation goes on. Outside, Ctrl-C keeps its usual meaning."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame) -> None:
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def streamer(tokenizer, out: TextIO):
    """A TextStreamer that writes the answer's text to `out` as soon as whole words decode."""
    from transformers import TextStreamer

    class Printer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text)
            out.flush()

    return Printer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate_answer(model, tokenizer, ids: list[int], gen_cfg: Any, out: TextIO) -> tuple[str, bool]:
    """(the answer's text, whether Ctrl-C ended it): `ids` continued, printed to `out` as it is generated."""
    import torch
    from transformers import StoppingCriteriaList

    from abba_cli.eval.generate import as_model_generation_config

    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    flag = stop_flag()
    with torch.inference_mode(), as_model_generation_config(model, gen_cfg), ctrl_c_ends_answer(flag):
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=gen_cfg,
            streamer=streamer(tokenizer, out),
            stopping_criteria=StoppingCriteriaList([flag]),
            tokenizer=tokenizer,
        )
    answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    return answer, flag.requested
