"""`strip_code_fence` (sandbox.py) against a line-by-line reference of the same rule, on random texts."""

import random
import re

from pipeline.sandbox import strip_code_fence

_OPEN = re.compile(r"^(`{3,})[^`]*$")


def reference(text: str) -> str:
    """The rule spelled out on a list of lines: exactly one fence enclosing the whole trimmed text."""
    lines = text.strip().split("\n")
    if len(lines) < 2:
        return text
    opening = _OPEN.match(lines[0].rstrip())
    if opening is None:
        return text
    ticks = opening.group(1)
    closing = lines[-1].strip()
    if not (closing.startswith(ticks) and set(closing) == {"`"}):
        return text
    if any(line.lstrip().startswith(ticks) for line in lines[1:-1]):
        return text
    return "\n".join(lines[1:-1])


PIECES = ["```", "````", "```python", "``` py", "`", "return x", "retur", "  ", "\t", "\n", "\r\n", " ```",
          "def f():", "    pass", "text", "\u00a0", "\x1c", "python"]  # fmt: skip


def test_matches_reference_on_random_texts():
    rng = random.Random(0)
    for _ in range(20000):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12)))
        assert strip_code_fence(text) == reference(text), repr(text)


def test_known_cases():
    assert strip_code_fence("```python\nreturn x\n```") == "return x"
    assert strip_code_fence("```\n```") == ""
    assert strip_code_fence("  ```py\na\n\nb\n````  \n") == "a\n\nb"
    two = "```\na\n```\nprose\n```\nb\n```"
    assert strip_code_fence(two) == two
    assert strip_code_fence("return retur") == "return retur"


def test_prepare_clean_responses_equals_strip_code_fence():
    """prepare's column-wise cleaning (spans + byte gather) gives `strip_code_fence` of every value."""
    import pyarrow as pa

    from pipeline.stages.prepare import clean_responses

    rng = random.Random(1)
    pieces = [*PIECES, "é", "日本", "😀", "\u2028"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    expected = [strip_code_fence(t) for t in texts]
    assert clean_responses(pa.array(texts)).to_pylist() == expected
    assert clean_responses(pa.array(texts, pa.large_string()).slice(7, 500)).to_pylist() == expected[7:507]
    assert clean_responses(pa.chunked_array([texts[:10], texts[10:20]])).to_pylist() == expected[:20]
    assert clean_responses(pa.array([], pa.string())).to_pylist() == []
