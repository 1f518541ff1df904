"""Cleaning and measuring responses: one fence removed, chat columns, token lengths."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.sandbox import code_fence_span
from pipeline.stages.prepare.scan import prompt_messages

logger = logging.getLogger("pipeline.prepare")


def prompt_parts(prompts: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(user message, assistant prefix or "") per row, parsing each distinct prompt once."""
    prompts = prompts.combine_chunks() if isinstance(prompts, pa.ChunkedArray) else prompts
    if pa.types.is_string(prompts.type) or pa.types.is_large_string(prompts.type):
        distinct = pc.unique(prompts)
        rows = pa.array(pc.index_in(prompts, value_set=distinct).to_numpy())
        values = distinct.to_pylist()
    else:
        rows, values = None, prompts.to_pylist()
    parsed = [prompt_messages(v) for v in values]
    user = pa.array([m[0]["content"] for m in parsed], pa.string())
    prefix = pa.array([m[1]["content"] if len(m) == 2 else "" for m in parsed], pa.string())
    return (user, prefix) if rows is None else (user.take(rows), prefix.take(rows))


def clean_responses(responses: pa.Array) -> pa.Array:
    """`strip_code_fence` of every value, as a string array.

    Only each value's kept span is computed in Python; the kept bytes are joined straight from the input's
    buffer, because building millions of ~2 KB Python strings back into Arrow is the slow part of prepare.
    """
    responses = responses.combine_chunks() if isinstance(responses, pa.ChunkedArray) else responses
    responses = responses.cast(pa.large_string())  # int64 offsets whatever the input type
    n = len(responses)
    spans = np.array([code_fence_span(r) for r in responses.to_pylist()], dtype=np.int64).reshape(n, 2)
    ascii_rows = pc.string_is_ascii(responses).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(~ascii_rows):  # character offsets differ from byte offsets here
        text = responses[int(i)].as_py()
        spans[i] = [len(text[: spans[i, 0]].encode()), len(text[: spans[i, 1]].encode())]
    offsets = np.frombuffer(responses.buffers()[1], np.int64)[responses.offset : responses.offset + n + 1]
    starts, stops = offsets[:-1] + spans[:, 0], offsets[:-1] + spans[:, 1]
    data = memoryview(responses.buffers()[2]) if n else memoryview(b"")
    kept = b"".join([data[a:b] for a, b in zip(starts.tolist(), stops.tolist(), strict=True)])
    new_offsets = np.concatenate([[0], np.cumsum(stops - starts)]).astype(np.int64)
    cleaned = pa.LargeStringArray.from_buffers(n, pa.py_buffer(new_offsets), pa.py_buffer(kept))
    return cleaned.cast(pa.string())


def chat_array(turns: list[tuple[str, pa.Array]]) -> pa.ListArray:
    """Rows of chat messages built column-wise: turn t of every row has role turns[t][0], content turns[t][1]."""
    n, k = len(turns[0][1]), len(turns)
    contents = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for _, c in turns]
    if k == 1:
        content = contents[0].cast(pa.string())
    else:
        interleave = pa.array(np.arange(n * k).reshape(k, n).T.ravel())
        content = pa.concat_arrays([c.cast(pa.string()) for c in contents]).take(interleave)
    role = pa.array([r for r, _ in turns] * n, pa.string())
    messages = pa.StructArray.from_arrays([role, content], names=["role", "content"])
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), messages)


@functools.lru_cache(maxsize=2)
def load_tokenizer(path: str):
    """Loaded once per process: the fingerprint and the length filter of the same run share it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def token_lengths(tokenizer, prompts: list, responses: list[str]) -> np.ndarray:
    from pipeline.tokenization import tokenize_prompt_response

    samples = tokenize_prompt_response(tokenizer, [prompt_messages(p) for p in prompts], responses)
    return np.array([len(s.input_ids) for s in samples])
