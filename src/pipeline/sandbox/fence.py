"""One enclosing Markdown code fence removed from a response: the rule every stage uses (prepare, rewards,
evaluation). Whole lines only, never a character-set strip (which would eat the "r" of ``return``)."""

from __future__ import annotations

import re

_OPEN_FENCE = re.compile(r"^(`{3,})[^`]*$")


def strip_code_fence(text: str) -> str:
    """Remove exactly one Markdown code fence enclosing the whole (trimmed) text; else return ``text``.

    Only whole lines are removed (never a character-set strip, which would eat the "r" of ``return``).
    Text with several fenced blocks, or prose around a block, is returned unchanged.
    """
    start, stop = code_fence_span(text)
    return text[start:stop]


def code_fence_span(text: str) -> tuple[int, int]:
    """`(start, stop)` of what `strip_code_fence` keeps: the inside of the fence, or all of ``text``.

    Works with indices into ``text`` rather than copies of it or a list of its lines: `prepare` runs it over
    millions of responses (tests/test_fence.py checks it against the line-by-line statement of the rule).
    """
    whole = (0, len(text))
    # [lo, hi) is text.strip(), found without copying the text where its ends need no trimming
    if text[:1] == "`":
        lo = 0
    elif text[:1].isspace():
        lo = len(text) - len(text.lstrip())
        if text[lo : lo + 1] != "`":
            return whole
    else:
        return whole
    hi = len(text) if text[-1:] == "`" else len(text.rstrip())
    first_nl = text.find("\n", lo, hi)
    if first_nl < 0:
        return whole
    last_nl = text.rfind("\n", lo, hi)
    opening = _OPEN_FENCE.match(text[lo:first_nl].rstrip())
    if opening is None:
        return whole
    ticks = opening.group(1)
    closing = text[last_nl + 1 : hi].strip()
    if not (closing.startswith(ticks) and set(closing) == {"`"}):
        return whole
    if last_nl == first_nl:  # an opening and a closing line with nothing between
        return (0, 0)
    # A fence line inside means the text is more than one block (e.g. ```a``` prose ```b```).
    if _has_fence_line(text, ticks, first_nl + 1, last_nl):
        return whole
    return (first_nl + 1, last_nl)


def _has_fence_line(text: str, ticks: str, start: int, stop: int) -> bool:
    """Whether a line of ``text[start:stop]`` (which starts a line) begins with `ticks` after blanks."""
    pos = text.find("`", start, stop)  # one character: a memchr scan, several times faster than "```"
    while pos >= 0:
        if text.startswith(ticks, pos, stop):
            line_start = max(start, text.rfind("\n", start, pos) + 1)
            if line_start == pos or text[line_start:pos].isspace():
                return True
        pos = text.find("`", pos + 1, stop)
    return False
