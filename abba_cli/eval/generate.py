"""Greedy batched generation: a fully specified GenerationConfig (nothing inherited from the checkpoint), left
padding with an attention mask, stop strings, progress with tokens/s.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from abba_cli.eval.scoring import truncate_at_stop


def _eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends a response: the checkpoint's eos ids (Llama 3 has several) and the tokenizer's."""
    ids: list[int] = []
    for source in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def greedy_generation_config(model, tokenizer, max_new_tokens: int, stop: Sequence[str]):
    """Greedy decoding with every decoding knob set explicitly to its neutral value.

    transformers fills any field left None from the checkpoint's generation_config.json, so a checkpoint's
    repetition_penalty or no_repeat_ngram_size would silently survive; `generate` also swaps this config in as
    the model's own while it runs, so nothing of the checkpoint's is left to inherit.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        num_beam_groups=1,
        num_return_sequences=1,
        temperature=1.0,
        top_k=50,  # the library default: greedy ignores it (0 would draw a warning per batch)
        top_p=1.0,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        length_penalty=1.0,
        min_new_tokens=0,
        max_new_tokens=max_new_tokens,
        stop_strings=list(stop) or None,
        eos_token_id=_eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


# What metrics.json records under `generation`: every field of the config that changes which tokens come out.
GENERATION_FIELDS = (
    "do_sample",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "length_penalty",
    "min_new_tokens",
    "max_new_tokens",
    "eos_token_id",
    "pad_token_id",
    "stop_strings",
)


def generation_settings(gen_cfg) -> dict[str, Any]:
    """The effective decoding settings of a GenerationConfig, for metrics.json."""
    return {k: getattr(gen_cfg, k) for k in GENERATION_FIELDS} | {
        "bad_words_ids": gen_cfg.bad_words_ids,
        "suppress_tokens": gen_cfg.suppress_tokens,
        "forced_bos_token_id": gen_cfg.forced_bos_token_id,
        "forced_eos_token_id": gen_cfg.forced_eos_token_id,
    }


@contextlib.contextmanager
def as_model_generation_config(model, gen_cfg) -> Iterator[None]:
    """generate() fills unset fields from `model.generation_config`: make that ours while generating."""
    saved = model.generation_config
    model.generation_config = gen_cfg
    try:
        yield
    finally:
        model.generation_config = saved


class _RowsFinished:
    """Stopping criterion for one `generate` call over a batch whose rows may have generated different amounts.

    A row is finished at an EOS id, a stop string, or its own token budget. transformers 5 keeps decoding a
    finished row (fed padding) until the batch's slowest row ends, so once at most `leave_at` rows are still
    running this ends the whole call: the finished rows leave and waiting prompts take their places.
    """

    def __init__(self, eos_ids, stop_criterion, prompt_width: int, budgets, leave_at: int) -> None:
        import torch

        self.eos_ids = eos_ids
        self.stop_criterion = stop_criterion
        self.prompt_width = prompt_width
        self.budgets = budgets
        self.leave_at = leave_at
        self.finished = torch.zeros(len(budgets), dtype=torch.bool, device=budgets.device)
        self.lengths = budgets.clone()  # tokens each finished row generated in this call (eos included)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        made = input_ids.shape[1] - self.prompt_width
        now = torch.isin(input_ids[:, -1], self.eos_ids) | (made >= self.budgets)
        if self.stop_criterion is not None:
            now |= self.stop_criterion(input_ids, scores)
        newly = now & ~self.finished
        self.lengths = torch.where(newly, made, self.lengths)
        self.finished |= now
        if int((~self.finished).sum()) <= self.leave_at:
            return torch.ones_like(self.finished)
        return self.finished.clone()


def _generate_round(model, tokenizer, rows, gen_cfg, stop_criterion, eos_ids, device, max_new, leave_at):
    """One `generate` call over `rows` ([prompt index, token ids so far, generated ids]); returns
    (finished rows, rows still running), each row's generated ids extended by this call's tokens."""
    import torch
    from transformers import StoppingCriteriaList

    batch = tokenizer.pad({"input_ids": [r[1] + r[2] for r in rows]}, padding=True, return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items()}
    width = batch["input_ids"].shape[1]
    budgets = torch.tensor([max_new - len(r[2]) for r in rows], device=device)
    criterion = _RowsFinished(eos_ids, stop_criterion, width, budgets, leave_at)
    # This round's budget goes in a copy of the config: generate() warns (once per process, on every eval)
    # when a generation_config comes with generation arguments beside it.
    round_cfg = copy.copy(gen_cfg)
    round_cfg.max_new_tokens = int(budgets.max())
    out = model.generate(
        **batch,
        generation_config=round_cfg,
        stopping_criteria=StoppingCriteriaList([criterion]),
        tokenizer=tokenizer,
    )
    new_ids = out[:, width:].tolist()
    finished = criterion.finished.tolist()
    lengths = criterion.lengths.tolist()
    eos = set(eos_ids.tolist())
    for j, ids in enumerate(new_ids):
        # A generate that ended without the criterion marking a row (one that does not call its stopping
        # criteria): the row's own tokens say whether it ended, so a round never repeats without progress.
        if not finished[j]:
            end = next((k + 1 for k, t in enumerate(ids) if t in eos), None)
            if end is not None or len(ids) >= int(budgets[j]) or not ids:
                finished[j], lengths[j] = True, end if end is not None else min(len(ids), int(budgets[j]))
    done, running = [], []
    for row, ids, fin, n in zip(rows, new_ids, finished, lengths, strict=True):
        if fin:
            done.append((row[0], row[1], row[2] + ids[:n]))
        else:  # a running row has generated every step of this call: no padding among its tokens
            running.append((row[0], row[1], row[2] + ids))
    return done, running


def generate_batches(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    device=None,
    desc: str = "generate",
) -> Iterator[list[tuple[int, str]]]:
    """Greedy completions, yielded as rows finish: [(prompt index, text cut at its first stop string)].

    Prompts are sorted by token length (longest first, so memory problems show in the first batch) and batched
    with left padding and an attention mask. Rows leave the batch when they finish: once half of a batch has
    finished and prompts are waiting, the running rows continue (their tokens so far re-read as a prompt) beside
    new prompts, instead of the whole batch decoding until its slowest row stops.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import StopStringCriteria

    if not prompts:  # e.g. --resume of a task whose every example is done
        return
    device = device or next(model.parameters()).device
    gen_cfg = greedy_generation_config(model, tokenizer, max_new_tokens, stop)
    eos_ids = torch.tensor(gen_cfg.eos_token_id, dtype=torch.long, device=device)
    stop_criterion = StopStringCriteria(tokenizer, list(stop)) if stop else None
    encoded = tokenizer(list(prompts))["input_ids"]
    waiting = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    waiting.reverse()  # popped from the end: longest first
    running: list = []
    new_tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=len(prompts), desc=desc, unit="ex", file=sys.stderr, dynamic_ncols=True)
    try:
        with torch.inference_mode(), as_model_generation_config(model, gen_cfg):
            while waiting or running:
                while waiting and len(running) < batch_size:
                    i = waiting.pop()
                    running.append((i, encoded[i], []))
                leave_at = len(running) // 2 if waiting else 0
                done, running = _generate_round(
                    model,
                    tokenizer,
                    running,
                    gen_cfg,
                    stop_criterion,
                    eos_ids,
                    device,
                    max_new_tokens,
                    leave_at,
                )
                if not done:
                    continue
                new_tokens += sum(len(r[2]) for r in done)
                texts = tokenizer.batch_decode([r[2] for r in done], skip_special_tokens=True)
                bar.update(len(done))
                bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):.1f}")
                yield [(r[0], truncate_at_stop(text, stop)) for r, text in zip(done, texts, strict=True)]
    finally:
        bar.close()


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    device=None,
    desc: str = "generate",
) -> list[str]:
    """Greedy completions of `prompts`, in input order, each cut at its first stop string."""
    outputs: list[str] = [""] * len(prompts)
    for batch in generate_batches(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        stop=stop,
        device=device,
        desc=desc,
    ):
        for i, text in batch:
            outputs[i] = text
    return outputs
