"""Pass 1: validate ids, prompts and rewards; hash prompts; find duplicate uids and oversized text."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import PipelineError
from pipeline.stages.prepare.config import PROMPT_KEY, PrepareConfig
from pipeline.stages.prepare.parallel import run_shared
from pipeline.stages.prepare.read import first_bad, first_null, iter_batches
from pipeline.tokenization import PromptError, parse_prompt

logger = logging.getLogger("pipeline.prepare")


@functools.lru_cache(maxsize=1 << 15)
def _parse_prompt_text(text: str) -> list[dict[str, str]]:
    return parse_prompt(text)


def prompt_messages(value) -> list[dict[str, str]]:
    """`parse_prompt` with a cache: RL data holds many responses per prompt. Callers must not mutate."""
    return _parse_prompt_text(value) if isinstance(value, str) else parse_prompt(value)


@functools.lru_cache(maxsize=4)
def prompt_hasher(seed: int):
    """prompt value -> uint64 hash of its canonical messages, salted by `seed` (cached per distinct text, per
    process: the work units of one process share the cache)."""
    salt = str(seed).encode()

    def key_of(messages: list[dict[str, str]]) -> int:
        canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()
        return int.from_bytes(hashlib.blake2b(canonical, digest_size=8, key=salt).digest(), "little")

    # Prompt texts recur across batches (and, in shuffled data, far apart): remember each text's key under a
    # 16-byte digest of the text, so memory stays small for long prompts and each text is parsed once
    known: dict[bytes, int] = {}

    def key_of_text(text: str) -> int:
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        key = known.get(digest)
        if key is None:
            if len(known) >= 1 << 20:  # about 100 MB: start over rather than grow without bound
                known.clear()
            key = known[digest] = key_of(prompt_messages(text))
        return key

    return lambda value: key_of_text(value) if isinstance(value, str) else key_of(prompt_messages(value))


@dataclass
class RowIndex:
    """Per-row facts gathered in pass 1 (a few bytes per row, so millions of rows fit)."""

    rewards: np.ndarray  # raw rewards, float64
    prompt_keys: np.ndarray  # uint64 hash of the canonical prompt
    duplicate: np.ndarray  # bool, a later occurrence of a uid
    too_large: np.ndarray  # bool, a prompt or response over max_text_bytes


@dataclass
class ScanJob:
    cfg: PrepareConfig
    unit: tuple[str, int | None, int, int]  # (file, row group or None, first global row, rows)
    file_row: int  # the unit's first row counted within its file, as errors name rows


def text_too_large(column: pa.Array, limit: int) -> np.ndarray:
    """Rows of a text column longer than `limit` bytes (other column types: none)."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return np.zeros(len(column), dtype=bool)
    return pc.fill_null(pc.greater(pc.binary_length(column), limit), False).to_numpy(zero_copy_only=False)


def scan_unit(job: ScanJob) -> tuple[np.ndarray, np.ndarray, pa.Array, np.ndarray]:
    """Pass 1 over one work unit: validate ids, prompts and rewards; return (rewards, prompt keys, uids, rows
    whose prompt or response is over max_text_bytes: dropped before anything parses or tokenizes them)."""
    cfg, (path, group, _, _) = job.cfg, job.unit
    rewards, keys, uid_chunks, large = [], [], [], []
    key_of = prompt_hasher(cfg.seed)
    offset = job.file_row
    columns = ["uid", PROMPT_KEY, cfg.reward_key, cfg.response_key]
    for batch in iter_batches(path, cfg.batch_rows, columns, None if group is None else [group]):
        uid_col = batch.column("uid")
        if uid_col.null_count:
            raise PipelineError(f"{path}: column 'uid' is null at row {offset + first_null(uid_col)}")
        reward = batch.column(cfg.reward_key)
        if reward.null_count:
            at = first_null(reward)
            raise PipelineError(
                f"{path}: column '{cfg.reward_key}' is null at row {offset + at}, uid {uid_col[at]}"
            )
        values = reward.to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            raise PipelineError(
                f"{path}: column '{cfg.reward_key}' has a non-finite value "
                f"({values[np.flatnonzero(bad)[0]]}) at {first_bad(bad, uid_col, offset)}"
            )
        too_large = text_too_large(batch.column(PROMPT_KEY), cfg.max_text_bytes)
        too_large |= text_too_large(batch.column(cfg.response_key), cfg.max_text_bytes)
        keys.append(hash_prompts(batch.column(PROMPT_KEY), key_of, path, uid_col, offset, too_large))
        large.append(too_large)
        rewards.append(values)
        uid_chunks.append(uid_col)
        offset += len(batch)
    uids = pa.concat_arrays(uid_chunks) if uid_chunks else pa.array([], pa.string())
    return np.concatenate(rewards), np.concatenate(keys), uids, np.concatenate(large)


def scan_rows(sources, units, cfg: PrepareConfig, pool=None, workers: int = 0) -> RowIndex:
    """Validate every row (ids, prompts, rewards) and collect what the transforms and filters need; the work
    units are shared between this process and the pool. The first bad row (in input order) is reported."""
    file_start, start = {}, 0
    for path, _, rows in sources:
        file_start[path], start = start, start + rows
    jobs = [ScanJob(cfg, unit, unit[2] - file_start[unit[0]]) for unit in units]
    parts = run_shared(scan_unit, jobs, pool, workers)
    rewards, keys, uids, large = zip(*parts, strict=True)
    return RowIndex(np.concatenate(rewards), np.concatenate(keys), find_duplicates(list(uids), cfg),
                    np.concatenate(large))  # fmt: skip


def hash_prompts(
    prompts: pa.Array, key_of, path: str, uids: pa.Array, offset: int, skip: np.ndarray | None = None
) -> np.ndarray:
    """uint64 key per row; each distinct prompt text is parsed and hashed once (RL data repeats prompts).
    Rows in `skip` (too large to parse) get key 0 and are never parsed."""
    if skip is not None and skip.any():
        keys = np.zeros(len(prompts), dtype=np.uint64)
        rows = np.flatnonzero(~skip)
        if len(rows):
            keys[rows] = hash_prompts(
                prompts.take(pa.array(rows)), key_of, path, uids.take(pa.array(rows)), offset
            )
        return keys
    if pa.types.is_string(prompts.type) or pa.types.is_large_string(prompts.type):
        if prompts.null_count:
            at = first_null(prompts)
            raise PipelineError(f"{path}: column '{PROMPT_KEY}' is null at row {offset + at}, uid {uids[at]}")
        distinct = pc.unique(prompts)
        row_to_distinct = pc.index_in(prompts, value_set=distinct).to_numpy()
        values, rows_of = distinct.to_pylist(), row_to_distinct
    else:  # a list-of-messages column: no cheap way to dedupe, hash row by row
        values, rows_of = prompts.to_pylist(), np.arange(len(prompts))
    distinct_keys = np.empty(len(values), dtype=np.uint64)
    for j, value in enumerate(values):
        try:
            distinct_keys[j] = key_of(value)
        except PromptError as err:
            at = int(np.flatnonzero(rows_of == j)[0])
            raise PipelineError(
                f"{path}: column '{PROMPT_KEY}' at row {offset + at}, uid {uids[at].as_py()!r}: {err}"
            ) from None
    return distinct_keys[rows_of]


def find_duplicates(uid_chunks: list[pa.Array], cfg: PrepareConfig) -> np.ndarray:
    """True for every occurrence of a uid after its first; an error unless dedupe=keep_first."""
    uids = pa.chunked_array(
        [u.cast(pa.large_string()) for u in uid_chunks]
    ).combine_chunks()  # files may differ
    counts = pc.value_counts(uids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    duplicate = np.zeros(len(uids), dtype=bool)
    if len(repeated) == 0:
        return duplicate
    if cfg.dedupe == "error":
        shown = ", ".join(repr(u) for u in repeated[:5].to_pylist())
        raise PipelineError(f"{cfg.data_path}: column 'uid' has duplicates (first: {shown}); "
                            "remove them or pass --dedupe keep_first")  # fmt: skip
    seen: set[str] = set()
    candidates = np.flatnonzero(pc.is_in(uids, value_set=repeated).to_numpy(zero_copy_only=False))
    for row, uid in zip(candidates, uids.take(pa.array(candidates)).to_pylist(), strict=True):
        duplicate[row] = uid in seen
        seen.add(uid)
    return duplicate
