"""Small LaTeX text helpers shared by recipes (MATH golds) and scoring (model answers): pure string code."""

from __future__ import annotations

import re

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (nested braces balanced), or of the brace-less form
    `\\boxed 5` (up to the next `$` or line end, as in Hendrycks' MATH code); None if absent or unclosed."""
    starts = [m.end() for m in _BOX_COMMAND.finditer(text)]
    if not starts:
        return None
    i = starts[-1]
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        depth, start = 0, i + 1
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[start:j].strip()
        return None
    bare = re.split(r"[$\n]", text[i:], maxsplit=1)[0].strip()
    return bare or None
