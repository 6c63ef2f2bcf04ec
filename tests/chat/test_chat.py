"""`abba chat`: the run's prompt format turn after turn, history within the context, one-shot answers equal to
greedy generation, Ctrl-C ending only the answer, and a real terminal session (a pseudo-terminal)."""

from __future__ import annotations

import io
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import build_tiny_tokenizer
from helpers import cli, cli_error_line, make_run, subprocess_env, tiny_raw_config, write_jsonl

from abba_cli.chat.conversation import Conversation, MessageTooLong, Turn
from abba_cli.chat.generation import Sampling
from abba_cli.chat.session import chat_loop, open_session
from abba_cli.data.prompts import chat_prompt, render_prompt

REPO = Path(__file__).resolve().parents[2]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def alpaca_run(tiny_model_dir, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("chat") / "run", tiny_model_dir)


@pytest.fixture(scope="module")
def chat_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A run whose config says it trained on chat data through CHATML."""
    root = tmp_path_factory.mktemp("chat-template")
    run = make_run(root / "run", tiny_model_dir, seed=1)
    rows = write_jsonl(root / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    raw = tiny_raw_config(
        root, tiny_model_dir, data={"recipe": "chat", "path": str(rows), "chat_template": CHATML}
    )
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    return run


def _greedy(session, prompt_text: str) -> str:
    """The reference answer: plain greedy `generate` on the prompt text, decoded."""
    import torch

    ids = session.tokenizer(prompt_text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = session.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=session.gen_cfg
        )
    return session.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_turns_render_as_the_run_trained():
    tok = build_tiny_tokenizer()
    alpaca = Conversation(tok, None, context_tokens=512, max_new_tokens=16)
    assert alpaca.render("What is 6 * 7?", []) == render_prompt("What is 6 * 7?")  # eval's prompt, exactly
    two = alpaca.render("And 6 + 7?", [Turn("What is 6 * 7?", "42")])
    assert two == render_prompt("What is 6 * 7?") + "42" + tok.eos_token + render_prompt("And 6 + 7?")

    tok.chat_template = CHATML
    chat = Conversation(tok, CHATML, context_tokens=512, max_new_tokens=16)
    assert chat.render("What is 6 * 7?", []) == chat_prompt(tok, CHATML, "What is 6 * 7?")
    assert chat.render("And 6 + 7?", [Turn("What is 6 * 7?", "42")]) == (
        "<|im_start|>user\nWhat is 6 * 7?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n"
        "<|im_start|>user\nAnd 6 + 7?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_oldest_turns_are_dropped_to_fit_the_context():
    tok = build_tiny_tokenizer()
    one_turn = len(tok(render_prompt("question 0") + "answer 0" + tok.eos_token)["input_ids"])
    last = len(tok(render_prompt("question 9"))["input_ids"])
    # Room for the new message and exactly two earlier turns.
    conv = Conversation(tok, None, context_tokens=last + 2 * one_turn + 8, max_new_tokens=8)
    for i in range(4):
        conv.add(f"question {i}", f"answer {i}")
    ids, dropped = conv.prompt_ids("question 9")
    assert dropped == 2 and len(ids) <= conv.context_tokens - conv.max_new_tokens
    assert tok.decode(ids).startswith(render_prompt("question 2"))
    conv.add("question 9", "answer 9", dropped)
    assert [t.user for t in conv.turns] == ["question 2", "question 3", "question 9"]
    with pytest.raises(MessageTooLong, match="context of"):
        Conversation(tok, None, context_tokens=last, max_new_tokens=8).prompt_ids("question 9")


def test_one_shot_prints_only_the_greedy_answer(alpaca_run, tiny_model_dir):
    session = open_session(alpaca_run, None, None, "auto", Sampling(), 12)
    expected = _greedy(session, render_prompt("What is 6 * 7?"))
    result = cli("chat", "--run", alpaca_run, "--prompt", "What is 6 * 7?", "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    # The adapter is merged in: the bare base answers otherwise.
    bare = cli("chat", "--model", tiny_model_dir, "--prompt", "What is 6 * 7?", "--max-new-tokens", "12")
    assert bare.exit_code == 0 and bare.stdout != result.stdout


def test_chat_trained_run_answers_through_its_template(chat_run):
    session = open_session(chat_run, None, None, "auto", Sampling(), 10)
    assert session.conversation.chat_template == CHATML
    expected = _greedy(session, chat_prompt(session.tokenizer, CHATML, "hi there"))
    result = cli("chat", "--run", chat_run, "--prompt", "hi there", "--max-new-tokens", "10")
    assert result.exit_code == 0 and result.stdout == expected + "\n"


def test_sampling_is_seeded_and_differs_from_greedy(alpaca_run):
    args = ("chat", "--run", alpaca_run, "--prompt", "hello", "--max-new-tokens", "16")
    sampled = [cli(*args, "--temperature", "1.5", "--seed", "7").stdout for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != cli(*args).stdout  # at temperature 1.5 over a random tiny model


def test_ctrl_c_ends_the_answer_not_the_conversation(alpaca_run):
    session = open_session(alpaca_run, None, None, "auto", Sampling(), 40)
    full = _greedy(session, render_prompt("hello"))

    class InterruptOnFirstToken(io.StringIO):
        def write(self, text: str) -> int:
            if not self.getvalue() and not getattr(self, "sent", False):
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C in the terminal
            return super().write(text)

    lines = iter(["hello", "/exit"])
    out, err = InterruptOnFirstToken(), io.StringIO()
    chat_loop(session, lambda prompt: next(lines), out, err)
    answer = session.conversation.turns[0].answer
    assert "(answer stopped)" in err.getvalue()
    assert len(session.tokenizer(answer)["input_ids"]) < len(session.tokenizer(full)["input_ids"])
    assert full.startswith(answer)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C means Ctrl-C again


def test_ctrl_c_as_an_answer_ends_does_not_end_the_chat(alpaca_run):
    """A Ctrl-C that lands after the answer's last token, before the next prompt, is ignored: the chat goes on."""
    session = open_session(alpaca_run, None, None, "auto", Sampling(), 8)

    class InterruptAfterAnswer(io.StringIO):
        def write(self, text: str) -> int:
            if text == "\n" and not getattr(
                self, "sent", False
            ):  # the line end reply() writes after the answer
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(text)

    lines = iter(["hello", "more", "/exit"])
    out, err = InterruptAfterAnswer(), io.StringIO()
    chat_loop(session, lambda prompt: next(lines), out, err)
    assert out.sent and [t.user for t in session.conversation.turns] == ["hello", "more"]
    assert "to leave" not in err.getvalue() and "(answer stopped)" not in err.getvalue()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


_UNREAD: dict[int, str] = {}  # per terminal: what was read past the last marker


def _read_until(fd: int, marker: str, seen: list[str], timeout: float = 180.0) -> str:
    """Terminal output up to and including the next `marker` (the pty writes \\r\\n); what follows it stays
    for the next call."""
    deadline = time.monotonic() + timeout
    buf = _UNREAD.pop(fd, "")
    while marker not in buf:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise AssertionError(f"no {marker!r} on the terminal; so far: {''.join(seen) + buf!r}")
        try:
            chunk = os.read(fd, 4096).decode("utf-8", "replace")
        except OSError:  # the child closed the terminal
            raise AssertionError(f"terminal closed before {marker!r}: {''.join(seen) + buf!r}") from None
        buf += chunk.replace("\r\n", "\n")
    end = buf.index(marker) + len(marker)
    buf, _UNREAD[fd] = buf[:end], buf[end:]
    seen.append(buf)
    return buf


def _wait_until_reading(pid: int, timeout: float = 60.0) -> None:
    """Until the child sleeps in a system call, which after drawing its prompt is its wait for a key. CPython's
    readline acts on a SIGINT only when it interrupts that wait: a Ctrl-C typed the instant the prompt appears,
    before the wait begins, is held until the next line is entered (as it would be for a person's, were anyone
    that fast). Without /proc (macOS), a person's reaction time instead."""
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():
        time.sleep(0.5)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]  # the main thread's: R running, S sleeping
        if state == "S":
            return
        time.sleep(0.01)
    raise AssertionError(f"abba chat (pid {pid}) never waited for input")


@pytest.mark.slow  # a subprocess on a pseudo-terminal
def test_terminal_session_two_turns_reset_ctrl_c_and_ctrl_d(alpaca_run, tmp_path):
    """A person at a terminal: two turns (the second sees the first), Ctrl-C at the prompt, /reset, Ctrl-D."""
    session = open_session(alpaca_run, None, None, "auto", Sampling(), 8)
    first = _greedy(session, render_prompt("hello"))
    second = _greedy(
        session, render_prompt("hello") + first + session.tokenizer.eos_token + render_prompt("more")
    )
    after_reset = _greedy(session, render_prompt("more"))
    assert second != after_reset  # so the test can tell history from none

    env = subprocess_env(tmp_path, PYTHONPATH=str(REPO), TERM="dumb")
    pid, fd = pty.fork()
    if pid == 0:  # the child: abba chat on the pseudo-terminal
        os.chdir(REPO)
        cmd = [sys.executable, "-m", "abba_cli", "chat", "--run", str(alpaca_run), "--max-new-tokens", "8"]
        os.execve(sys.executable, cmd, env)
    seen: list[str] = []
    try:
        _read_until(fd, ">>> ", seen)
        assert "/reset clears the history" in seen[-1]
        os.write(fd, b"hello\n")
        assert first in _read_until(fd, ">>> ", seen)
        os.write(fd, b"more\n")
        assert second in _read_until(fd, ">>> ", seen)
        _wait_until_reading(pid)
        os.write(fd, b"\x03")  # Ctrl-C at the prompt: the program stays
        _read_until(fd, "to leave", seen)
        _read_until(fd, ">>> ", seen)
        os.write(fd, b"/reset\n")
        _read_until(fd, "history cleared", seen)
        _read_until(fd, ">>> ", seen)
        os.write(fd, b"more\n")
        assert after_reset in _read_until(fd, ">>> ", seen)
        os.write(fd, b"\x04")  # Ctrl-D
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, "".join(seen)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--top-p", "0.9"], "--top-p applies to sampling"),
        (["--temperature", "-1"], "--temperature -1.0: expected 0 (greedy)"),
        (["--temperature", "1", "--top-p", "1.5"], "--top-p 1.5: expected a number in (0, 1]"),
        (["--temperature", "1", "--top-k", "0"], "--top-k 0: expected a positive number"),
        (["--prompt-format", "xml"], "--prompt-format 'xml': expected one of auto, chat, alpaca"),
        (["--prompt", "  "], "--prompt: empty message"),
        (["--max-new-tokens", "512"], "--max-new-tokens 512: the model's context is 512 tokens"),
    ],
)
def test_bad_options_are_one_line(alpaca_run, args, expected):
    result = cli("chat", "--run", alpaca_run, "--prompt", "hello", *args)
    assert result.exit_code == 2
    assert expected in cli_error_line(result)


def test_no_run_and_no_model_is_one_line(tmp_path):
    result = cli("chat", "--prompt", "hello")
    assert result.exit_code == 2 and "no finished run recorded" in cli_error_line(result)
    result = cli("chat", "--run", tmp_path / "nope", "--prompt", "hello")
    assert result.exit_code == 2 and "no such run directory" in cli_error_line(result)
