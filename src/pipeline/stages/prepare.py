"""Prepare stage: validate, clean, transform, filter and split reward-keyed code-RL data.

    pipeline prepare --data_path logs/*.parquet --output_dir data/prepared \\
        --reward_key normalized_reward --response_key unprocessed_response --datafilter posonly

Input rows (parquet, read one row group at a time; or jsonl): `uid`, `prompt_pretokenized` (JSON list of chat
messages: a user turn and an optional assistant prefix; plain text = one user message), the reward column
`reward_key` and the response column `response_key`. Everything is checked before anything is written; the
first problem is one line naming file, column and row/uid (exit 2), and no output folder appears.

Order of operations: dedupe → clean (one enclosing Markdown fence removed) → reward transforms (clip, then
normalize; result in column `reward_output_key`, the raw column is kept) → filters (datafilter, then token
length) → split (by a hash of the prompt, so no prompt is in both splits) → views.

Output (`output_dir`, written under a temporary name and renamed when complete):
- `rl/{train,eval}-NNNNN.parquet`: every input column (response cleaned) + `reward` + `prompt_id` (uint64 hash
  of the canonical prompt: rows with equal prompts share it). An input column named like the output reward
  (`reward_output_key`, e.g. `--reward_key reward`) is kept as `raw_reward`; the manifest's
  `columns.raw_reward` names the raw reward's column either way;
- `sft/{train,eval}-NNNNN.parquet`: `messages` (user, assistant = prefix + response) for rows whose reward
  exceeds `pos_threshold`;
- `pairs/{train,eval}-NNNNN.parquet`: `prompt`/`chosen`/`rejected` (+ rewards, uids) from responses to the
  same prompt whose rewards differ by at least `pair_margin`, chosen from ids and rewards in memory. A pair
  whose two rows are read in one batch (a prompt's responses stored together, as logged RL data usually
  is) is written while its rows are cleaned; the others, and all pairs after a `max_length` filter, are
  read back from the rl shards (`*late-*` shards; the rl view is written aside if not among the views);
- `manifest.json`: sources with sha256, rows in/out, drops per reason, the config, tokenizer fingerprint.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import outputs
from pipeline.configs import parse_stage_args
from pipeline.data import prepared_shards, resolve_files, sha256_file
from pipeline.errors import PipelineError
from pipeline.models import check_model_dir
from pipeline.runinfo import atomic_write_text
from pipeline.sandbox import code_fence_span
from pipeline.tokenization import PromptError, parse_prompt

logger = logging.getLogger("pipeline.prepare")
SCHEMA_VERSION = 1
PAIRS_PER_BUCKET = 10_000  # pairs assembled at once in pass 3 (~40 MB of text at 2 KB responses)
PROMPT_KEY = "prompt_pretokenized"


@dataclass
class PrepareConfig:
    data_path: str = field(
        metadata={"help": "Input parquet/jsonl: a file, folder, glob or comma-separated list."}
    )
    output_dir: str = field(metadata={"help": "Folder to create (it must not exist unless overwrite=true)."})
    reward_key: str = field(default="normalized_reward", metadata={"help": "Column holding the reward."})
    response_key: str = field(
        default="unprocessed_response", metadata={"help": "Column holding the response."}
    )
    reward_output_key: str = field(
        default="reward", metadata={"help": "Column the trainers read the reward from."}
    )
    dedupe: Literal["error", "keep_first"] = field(
        default="error",
        metadata={"help": "Duplicate uids: an error listing the first few, or keep the first."},
    )
    reward_clip: str | None = field(
        default=None, metadata={"help": "Clip rewards to 'lo,hi', e.g. '-1.5,1.5'."}
    )
    reward_normalize: Literal["none", "zscore", "minmax", "rank"] = field(
        default="none",
        metadata={"help": "Normalize rewards after clipping: none|zscore|minmax (to [0,1])|rank."},
    )
    normalize_per_prompt: bool = field(
        default=False, metadata={"help": "Normalize within each prompt's group."}
    )
    datafilter: Literal["none", "posonly", "negonly", "topk_per_prompt"] = field(
        default="none",
        metadata={
            "help": "none: every row; posonly: reward > pos_threshold; negonly: reward <= neg_threshold; "
            "topk_per_prompt: the `topk` best rows of each prompt. Applied to the transformed reward."
        },
    )
    pos_threshold: float = field(default=0.75, metadata={"help": "posonly / SFT view: keep reward > this."})
    neg_threshold: float = field(default=0.0, metadata={"help": "negonly: keep reward <= this."})
    topk: int = field(default=1, metadata={"help": "Rows kept per prompt by topk_per_prompt."})
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Target tokenizer (local folder) for the length filter and fingerprint."},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Drop rows whose prompt + response exceed this many tokens (needs tokenizer)."},
    )
    eval_fraction: float = field(default=0.05, metadata={"help": "Share of prompts held out for evaluation."})
    pair_margin: float = field(
        default=0.5, metadata={"help": "Preference pairs need rewards at least this far apart."}
    )
    max_pairs_per_prompt: int = field(default=4, metadata={"help": "Cap on preference pairs per prompt."})
    views: str = field(
        default="rl,sft,pairs", metadata={"help": "Comma-separated views to write: rl, sft, pairs."}
    )
    row_group_size: int = field(
        default=10_000, metadata={"help": "Rows per parquet row group in the outputs."}
    )
    shard_rows: int = field(default=500_000, metadata={"help": "Rows per output shard file."})
    max_text_bytes: int = field(
        default=1_000_000,
        metadata={
            "help": "Rows whose prompt or response is longer than this many bytes (UTF-8) are dropped and "
            "counted (drops.text_too_large) before anything parses, cleans or tokenizes them."
        },
    )
    batch_rows: int = field(default=5_000, metadata={"help": "Rows read per batch (bounds memory)."})
    seed: int = field(default=0, metadata={"help": "Salt of the prompt hash that decides the split."})
    num_proc: int = field(
        default=0,
        metadata={"help": "Worker processes for cleaning/writing (0: up to 2 for inputs of 200k rows or more, "
                  "else 1). Output rows are the same; shard files are named per worker."},
    )  # fmt: skip
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace output_dir if it exists and is an earlier prepare output "
            "(any other folder is refused)."
        },
    )


# ------------------------------------------------------------------------------------------ reading


def open_sources(files: list[str]) -> list[tuple[str, pa.Schema, int]]:
    """(file, schema, rows) per input file; a file that is not readable parquet/jsonl is named here."""
    sources = []
    for path in files:
        try:
            if path.endswith(".parquet"):
                meta = pq.ParquetFile(path)
                sources.append((path, meta.schema_arrow, meta.metadata.num_rows))
            else:
                table = read_json_table(path)
                sources.append((path, table.schema, table.num_rows))
            if sources[-1][2] == 0:
                raise PipelineError(f"{path}: has no rows")
        except PipelineError:
            raise
        except Exception as err:
            kind = "parquet" if path.endswith(".parquet") else "jsonl"
            raise PipelineError(f"{path}: not a readable {kind} file ({str(err).splitlines()[0]})") from None
    return sources


def read_json_table(path: str) -> pa.Table:
    import pyarrow.json as pj

    try:
        return pj.read_json(path)
    except pa.ArrowInvalid as err:
        raise PipelineError(f"{path}: invalid JSON lines ({str(err).splitlines()[0]})") from None


def iter_batches(
    path: str, batch_rows: int, columns: list[str] | None = None, row_groups: list[int] | None = None
):
    """Record batches of one file (optionally some row groups); parquet is streamed so memory stays bounded."""
    if path.endswith(".parquet"):
        yield from pq.ParquetFile(path).iter_batches(
            batch_size=batch_rows, columns=columns, row_groups=row_groups
        )
    else:
        table = read_json_table(path)
        yield from (table.select(columns) if columns else table).to_batches(max_chunksize=batch_rows)


def raw_column_name(cfg: PrepareConfig) -> str:
    """Where an input column named like the output reward column (`reward_output_key`) is kept: `raw_<name>`.
    So `--reward_key reward` works: the transformed reward is `reward`, the raw one `raw_reward`."""
    return f"raw_{cfg.reward_output_key}"


def raw_reward_column(cfg: PrepareConfig) -> str:
    """The column of the views that holds the input's reward as it came in."""
    return raw_column_name(cfg) if cfg.reward_key == cfg.reward_output_key else cfg.reward_key


def check_schema(path: str, schema: pa.Schema, cfg: PrepareConfig) -> None:
    for column, role in (
        ("uid", "the row id"),
        (PROMPT_KEY, "the chat prompt"),
        (cfg.reward_key, "the reward (set --reward_key)"),
        (cfg.response_key, "the response (set --response_key)"),
    ):
        if column not in schema.names:
            raise PipelineError(f"{path}: missing column '{column}' ({role}); columns are {schema.names}")
    renamed = raw_column_name(cfg)
    if cfg.reward_output_key in schema.names and renamed in schema.names:
        raise PipelineError(f"{path}: columns '{cfg.reward_output_key}' and '{renamed}' both exist, and prepare writes "
                            f"the reward into '{cfg.reward_output_key}' (keeping the input's as '{renamed}'); "
                            "set --reward_output_key to a free name")  # fmt: skip
    taken = {"uid", PROMPT_KEY, cfg.response_key, "prompt_id"}
    if cfg.reward_output_key in taken:
        raise PipelineError(f"reward_output_key '{cfg.reward_output_key}' would overwrite the column of that name; "
                            "choose another")  # fmt: skip
    if "prompt_id" in schema.names:
        raise PipelineError(f"{path}: column 'prompt_id' is written by prepare (a hash of the prompt); rename the "
                            "input's")  # fmt: skip
    reward_type = schema.field(cfg.reward_key).type
    if not (pa.types.is_integer(reward_type) or pa.types.is_floating(reward_type)):
        raise PipelineError(f"{path}: column '{cfg.reward_key}' must be numeric, found {reward_type}")
    for column in ("uid", cfg.response_key):
        if not (
            pa.types.is_string(schema.field(column).type)
            or pa.types.is_large_string(schema.field(column).type)
        ):
            raise PipelineError(
                f"{path}: column '{column}' must be strings, found {schema.field(column).type}"
            )


# ------------------------------------------------------------------------------------------ pass 1


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


def first_bad(mask: np.ndarray, uids: list[str] | pa.Array, offset: int) -> str:
    i = int(np.flatnonzero(mask)[0])
    uid = uids[i].as_py() if isinstance(uids, (pa.Array, pa.ChunkedArray)) else uids[i]
    return f"row {offset + i}, uid {uid!r}"


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


def first_null(column: pa.Array) -> int:
    return int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])


# ------------------------------------------------------------------------------------------ rewards, filters


def parse_clip(spec: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in spec.split(","))
    except ValueError:
        raise PipelineError(f"reward_clip must be 'lo,hi' (e.g. '-1.5,1.5'), got {spec!r}") from None
    if not lo < hi:
        raise PipelineError(f"reward_clip: lo must be below hi, got {spec!r}")
    return lo, hi


def normalize(values: np.ndarray, method: str) -> np.ndarray:
    """One group's rewards normalized; a constant group maps to 0 (zscore, rank) or 0.5 (minmax)."""
    if method == "none" or len(values) == 0:
        return values
    if method == "zscore":
        std = values.std()
        return (values - values.mean()) / std if std > 0 else np.zeros_like(values)
    if method == "minmax":
        span = values.max() - values.min()
        return (values - values.min()) / span if span > 0 else np.full_like(values, 0.5)
    # rank: average ranks of ties, scaled to [-1, 1]
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=np.float64)
    uniq, inverse = np.unique(values, return_inverse=True)
    mean_rank = np.bincount(inverse, weights=ranks) / np.bincount(inverse)
    ranks = mean_rank[inverse]
    return 2 * ranks / (len(values) - 1) - 1 if len(values) > 1 else np.zeros_like(values)


def transform_rewards(index: RowIndex, keep: np.ndarray, cfg: PrepareConfig) -> np.ndarray:
    """Clip then normalize the kept rows' rewards (globally or per prompt); dropped rows get NaN."""
    out = np.full(len(index.rewards), np.nan)
    values = index.rewards[keep]
    if cfg.reward_clip:
        values = np.clip(values, *parse_clip(cfg.reward_clip))
    if cfg.normalize_per_prompt and cfg.reward_normalize != "none":
        groups = index.prompt_keys[keep]
        order = np.argsort(groups, kind="stable")
        bounds = np.flatnonzero(np.diff(groups[order])) + 1
        for chunk in np.split(order, bounds):
            values[chunk] = normalize(values[chunk], cfg.reward_normalize)
    else:
        values = normalize(values, cfg.reward_normalize)
    out[keep] = values
    return out


def top_k_mask(keys: np.ndarray, rewards: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    """The k highest-reward kept rows of each prompt (ties: earlier row first)."""
    rows = np.flatnonzero(keep)
    order = rows[np.lexsort((rows, -rewards[rows], keys[rows]))]
    group_start = np.r_[True, keys[order][1:] != keys[order][:-1]]
    position = np.arange(len(order)) - np.maximum.accumulate(np.where(group_start, np.arange(len(order)), 0))
    mask = np.zeros(len(keys), dtype=bool)
    mask[order[position < k]] = True
    return mask


def apply_datafilter(
    index: RowIndex, rewards: np.ndarray, keep: np.ndarray, cfg: PrepareConfig
) -> np.ndarray:
    if cfg.datafilter == "posonly":
        return keep & (rewards > cfg.pos_threshold)
    if cfg.datafilter == "negonly":
        return keep & (rewards <= cfg.neg_threshold)
    if cfg.datafilter == "topk_per_prompt":
        if cfg.topk < 1:
            raise PipelineError(f"topk must be >= 1, got {cfg.topk}")
        return keep & top_k_mask(index.prompt_keys, rewards, keep, cfg.topk)
    return keep


# ------------------------------------------------------------------------------------------ writing


class ShardWriter:
    """Writes `<dir>/<split>-NNNNN.parquet` shards of at most `shard_rows` rows."""

    def __init__(self, folder: Path, split: str, cfg: PrepareConfig, prefix: str = ""):
        self.folder, self.split, self.cfg, self.prefix = folder, split, cfg, prefix
        self.writer: pq.ParquetWriter | None = None
        self.shard, self.rows_in_shard, self.rows = 0, 0, 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self.writer is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                path = self.folder / f"{self.split}-{self.prefix}{self.shard:05d}.parquet"
                self.writer = pq.ParquetWriter(path, table.schema)
            take = min(table.num_rows, self.cfg.shard_rows - self.rows_in_shard)
            self.writer.write_table(table.slice(0, take), row_group_size=self.cfg.row_group_size)
            self.rows_in_shard += take
            self.rows += take
            table = table.slice(take)
            if self.rows_in_shard >= self.cfg.shard_rows:
                self.close()
                self.shard, self.rows_in_shard = self.shard + 1, 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def split_of(keys: np.ndarray, eval_fraction: float) -> np.ndarray:
    """True where the prompt is held out: its hash, read as a fraction in [0, 1), is below eval_fraction."""
    return (keys >> np.uint64(11)).astype(np.float64) / float(1 << 53) < eval_fraction


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


def choose_pairs(keys: np.ndarray, rewards: np.ndarray, keep: np.ndarray, cfg: PrepareConfig):
    """Preference pairs from ids and rewards alone: (chosen rows, rejected rows), global row indices.

    Within each prompt the kept rows are sorted best first (ties: earlier row first); best pairs with worst,
    second best with second worst, ... (each response in at most one pair), up to `max_pairs_per_prompt`,
    keeping those whose rewards differ by at least `pair_margin`. Pairs come out ordered by their first row, so reading their text back is local.
    """
    rows = np.flatnonzero(keep)
    order = rows[np.lexsort((rows, -rewards[rows], keys[rows]))]
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    group = np.repeat(np.arange(len(starts)), sizes)
    position = np.arange(len(order)) - starts[group]
    first_half = position < np.minimum(sizes[group] // 2, cfg.max_pairs_per_prompt)
    good = order[first_half]
    bad = order[(starts[group] + sizes[group] - 1 - position)[first_half]]
    wide = rewards[good] - rewards[bad] >= cfg.pair_margin  # shrinks with position: no gaps within a prompt
    good, bad = good[wide], bad[wide]
    by_first_row = np.argsort(np.minimum(good, bad), kind="stable")
    return good[by_first_row], bad[by_first_row]


@dataclass
class RowPlan:
    """Pass 1's decisions, one entry per input row (a few bytes each)."""

    keep: np.ndarray
    rewards: np.ndarray
    prompt_keys: np.ndarray
    is_eval: np.ndarray


@dataclass
class ViewsJob:
    cfg: PrepareConfig
    views: list[str]
    tmp: str
    prefix: str  # shard-name prefix of this worker
    units: list[tuple[str, int | None, int, int]]  # (file, row group or None, first global row, rows)
    plan: RowPlan
    # pairs (chosen rows, rejected rows; global, ordered by first row) starting in these units, or None;
    # those whose two rows fall in one read batch are written here, the rest in pass 3
    pairs: tuple[np.ndarray, np.ndarray] | None = None


def work_units(sources) -> list[tuple[str, int | None, int, int]]:
    """Parquet row groups (or whole jsonl files) with their first global row: the pieces workers share."""
    units, offset = [], 0
    for path, _, rows in sources:
        if path.endswith(".parquet"):
            meta = pq.ParquetFile(path).metadata
            for group in range(meta.num_row_groups):
                units.append((path, group, offset, meta.row_group(group).num_rows))
                offset += meta.row_group(group).num_rows
        else:
            units.append((path, None, offset, rows))
            offset += rows
    return units


def split_evenly(items: list, parts: int) -> list[list]:
    """Contiguous, nearly equal pieces (contiguous keeps each worker's output in input order)."""
    size = max(1, -(-len(items) // parts))
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


@contextlib.contextmanager
def worker_pool(num_proc: int):
    """`num_proc - 1` spawned worker processes (pyarrow's threads make fork unsafe), or None for one process.
    The workers start importing this module at once; pass 1 hands them work as soon as they are up."""
    if num_proc <= 1:
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with ProcessPoolExecutor(num_proc - 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for _ in range(num_proc - 1):
            pool.submit(time.sleep, 0)
        yield pool


def run_jobs(function, jobs: list, pool, desc: str | None = None, total: int | None = None) -> list:
    """Run jobs in order. This process runs the first itself (it is resident already, so only the pool's
    processes add memory) and the pool runs the rest."""
    if pool is None or len(jobs) <= 1:
        return [function(job, progress=(desc, total)) for job in jobs]
    others = [pool.submit(function, job) for job in jobs[1:]]
    share = total and -(-total // len(jobs))  # the bar shows this process's share
    first = function(jobs[0], progress=(desc, share))
    return [first, *(future.result() for future in others)]


def run_shared(function, jobs: list, pool, workers: int) -> list:
    """Many small jobs, results in job order: this process takes jobs from the front while the pool's
    `workers` take them from the back (a couple queued each), so no side waits for the other to start up."""
    if pool is None or len(jobs) <= 1:
        return [function(job) for job in jobs]
    results: list = [None] * len(jobs)
    queued: dict = {}
    front, back = 0, len(jobs)
    try:
        while front < back:
            while back > front and sum(not f.done() for f in queued.values()) < 2 * workers:
                back -= 1
                queued[back] = pool.submit(function, jobs[back])
            if front < back:
                results[front] = function(jobs[front])
                front += 1
        for i in sorted(queued):  # in job order, so the earliest failing job's error is the one raised
            results[i] = queued[i].result()
    except BaseException:
        for future in queued.values():
            future.cancel()
        raise
    return results


def write_views(job: ViewsJob, progress: tuple = (None, None)) -> dict:
    """Pass 2 over this job's rows: clean responses, drop too-long rows, write the rl and sft shards and the
    pairs whose two rows are in one batch.

    Returns rows written per view and split, the global indices of the rows too long to keep, and which of
    `job.pairs` were written (logged data keeps a prompt's responses together, so most pairs are)."""
    from tqdm.auto import tqdm

    cfg, views, tmp, plan = job.cfg, job.views, Path(job.tmp), job.plan
    tokenizer = None
    if cfg.tokenizer_name_or_path and cfg.max_length is not None:
        tokenizer = load_tokenizer(cfg.tokenizer_name_or_path)
    writers = {(view, split): ShardWriter(tmp / view, split, cfg, job.prefix)
               for view in ("rl", "sft", "pairs") for split in ("train", "eval")}  # fmt: skip
    too_long_rows = []
    good, bad = job.pairs if job.pairs is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    first, last = np.minimum(good, bad), np.maximum(good, bad)
    pairs_written = []
    desc, total = progress
    bar = tqdm(total=total, desc=desc, unit="row", disable=desc is None or (total or 0) < 100_000)
    for path, group, first_row, _ in job.units:
        offset = first_row
        for batch in iter_batches(path, cfg.batch_rows, row_groups=None if group is None else [group]):
            n = batch.num_rows
            sl = slice(offset, offset + n)
            offset += n
            bar.update(n)
            mask = plan.keep[sl].copy()
            response_col = batch.column(cfg.response_key)
            if response_col.null_count:
                at = first_null(response_col)
                raise PipelineError(f"{path}: column '{cfg.response_key}' is null at row {sl.start + at}, "
                                    f"uid {batch.column('uid')[at]}")  # fmt: skip
            rows = np.flatnonzero(mask)
            if not len(rows):
                continue
            selected = pa.Table.from_batches([batch])
            if len(rows) < n:
                selected = selected.take(pa.array(rows))
            del batch, response_col
            responses = clean_responses(selected.column(cfg.response_key))
            if tokenizer is not None:
                prompts = selected.column(PROMPT_KEY).to_pylist()
                long = token_lengths(tokenizer, prompts, responses.to_pylist()) > cfg.max_length
                too_long_rows.append(rows[long] + sl.start)
                mask[rows[long]] = False
                selected, responses = selected.filter(pa.array(~long)), responses.filter(pa.array(~long))
                if not mask.any():
                    continue
            selected = selected.set_column(selected.schema.get_field_index(cfg.response_key), cfg.response_key,
                                           responses)  # fmt: skip
            if cfg.reward_output_key in selected.column_names:  # the input's column keeps its values, renamed
                names = selected.column_names
                names[names.index(cfg.reward_output_key)] = raw_column_name(cfg)
                selected = selected.rename_columns(names)
            selected = selected.append_column(cfg.reward_output_key, pa.array(plan.rewards[sl][mask]))
            selected = selected.append_column("prompt_id", pa.array(plan.prompt_keys[sl][mask]))
            a, b = np.searchsorted(first, [sl.start, sl.stop])
            inside = np.flatnonzero(last[a:b] < sl.stop) + a  # pairs with both rows in this batch
            if len(inside):
                pairs_written.append(inside)
                at_good = np.searchsorted(rows, good[inside] - sl.start)
                at_bad = np.searchsorted(rows, bad[inside] - sl.start)
                for split, held_out in (("train", False), ("eval", True)):
                    mine = plan.is_eval[good[inside]] == held_out
                    if mine.any():
                        writers["pairs", split].write(pair_table(
                            selected, cfg, at_good[mine], at_bad[mine],
                            plan.rewards[good[inside][mine]], plan.rewards[bad[inside][mine]],
                        ))  # fmt: skip
            eval_rows = plan.is_eval[sl][mask]
            for split, split_mask in (("train", ~eval_rows), ("eval", eval_rows)):
                part = selected.filter(pa.array(split_mask))
                if "rl" in views:
                    writers["rl", split].write(part)
                if "sft" in views:
                    pos = part.filter(pc.greater(part.column(cfg.reward_output_key), cfg.pos_threshold))
                    if pos.num_rows:
                        user, prefix = prompt_parts(pos.column(PROMPT_KEY))
                        answer = pc.binary_join_element_wise(prefix, pos.column(cfg.response_key), "")
                        messages = chat_array([("user", user), ("assistant", answer)])
                        writers["sft", split].write(pa.table({
                            "uid": pos.column("uid"), "messages": messages,
                            cfg.reward_output_key: pos.column(cfg.reward_output_key),
                        }))  # fmt: skip
    bar.close()
    for writer in writers.values():
        writer.close()
    too_long = np.concatenate(too_long_rows) if too_long_rows else np.zeros(0, dtype=np.int64)
    written = np.concatenate(pairs_written) if pairs_written else np.zeros(0, dtype=np.int64)
    return {"rows": {f"{view}_{split}": w.rows for (view, split), w in writers.items()}, "too_long": too_long,
            "pairs_written": written}  # fmt: skip


def pair_table(rows: pa.Table, cfg: PrepareConfig, at_good, at_bad, good_reward, bad_reward) -> pa.Table:
    """Preference rows from cleaned rl rows: `rows` holds them, `at_good`/`at_bad` index the two sides."""
    at_good, at_bad = pa.array(at_good), pa.array(at_bad)
    user, prefix = prompt_parts(rows.column(PROMPT_KEY).take(at_good))
    responses = rows.column(cfg.response_key)
    chosen, rejected = responses.take(at_good), responses.take(at_bad)
    if pc.any(pc.not_equal(prefix, "")).as_py():  # an assistant prefix starts the answer
        chosen = pc.binary_join_element_wise(prefix, chosen, "")
        rejected = pc.binary_join_element_wise(prefix, rejected, "")
    return pa.table({
        "prompt": chat_array([("user", user)]),
        "chosen": chat_array([("assistant", chosen)]),
        "rejected": chat_array([("assistant", rejected)]),
        "chosen_reward": np.asarray(good_reward, dtype=np.float64),
        "rejected_reward": np.asarray(bad_reward, dtype=np.float64),
        "chosen_uid": rows.column("uid").take(at_good),
        "rejected_uid": rows.column("uid").take(at_bad),
    })  # fmt: skip


@dataclass
class ScatterJob:
    """Pass 3a: one process's share of a split's rl row groups, and the paired rows in it."""

    cfg: PrepareConfig
    work: str  # folder for bucket files
    prefix: str
    split: str
    units: list[tuple[str, int | None, int, int]]  # rl shard row groups; first row = position in the split
    rows: np.ndarray  # positions of the paired rows in these units, sorted
    buckets: np.ndarray  # bucket of each of those rows


@dataclass
class GatherJob:
    """Pass 3b: buckets of pairs to assemble from their bucket files, and write."""

    cfg: PrepareConfig
    tmp: str
    work: str
    prefix: str
    split: str
    buckets: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    # (bucket, chosen positions, rejected positions, chosen rewards, rejected rewards)


def scatter_pair_rows(job: ScatterJob, progress: tuple = (None, None)) -> None:
    """Read this share of the rl shards once, in order, and append each paired row (cleaned text and all) to
    the Arrow file of its pair's bucket. Every pair's rows are then in one small file, wherever they were."""
    cfg, writers = job.cfg, {}
    columns = ["uid", PROMPT_KEY, cfg.response_key]
    try:
        for path, group, first, n in job.units:
            lo, hi = np.searchsorted(job.rows, [first, first + n])
            if lo == hi:
                continue  # no paired row in this row group: not even read
            offset = first
            for batch in iter_batches(path, cfg.batch_rows, columns, None if group is None else [group]):
                a, b = np.searchsorted(job.rows, [offset, offset + batch.num_rows])
                if a < b:
                    by_bucket = np.argsort(job.buckets[a:b], kind="stable")
                    rows, buckets = job.rows[a:b][by_bucket], job.buckets[a:b][by_bucket]
                    table = pa.Table.from_batches([batch]).take(pa.array(rows - offset))
                    table = table.append_column("position", pa.array(rows))
                    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
                    for start, stop in zip(starts, [*starts[1:], len(rows)], strict=True):
                        bucket = int(buckets[start])
                        if bucket not in writers:
                            name = f"{job.split}-{bucket:06d}-{job.prefix}.arrow"
                            writers[bucket] = pa.ipc.new_file(Path(job.work) / name, table.schema)
                        writers[bucket].write_table(table.slice(start, stop - start))
                offset += batch.num_rows
    finally:
        for writer in writers.values():
            writer.close()


def gather_pairs(job: GatherJob, progress: tuple = (None, None)) -> int:
    """Assemble each bucket's pairs from its files (both sides of every pair are there) and write them."""
    from tqdm.auto import tqdm

    desc, total = progress
    bar = tqdm(total=total, desc=desc, unit="pair", disable=desc is None or (total or 0) < 100_000)
    writer = ShardWriter(Path(job.tmp) / "pairs", job.split, job.cfg, f"{job.prefix}late-")
    for bucket, good, bad, good_reward, bad_reward in job.buckets:
        files = sorted(Path(job.work).glob(f"{job.split}-{bucket:06d}-*.arrow"))
        parts = []
        for file in files:
            with pa.memory_map(str(file)) as source:
                parts.append(pa.ipc.open_file(source).read_all())
        rows = pa.concat_tables(parts)
        positions = rows.column("position").to_numpy()
        order = np.argsort(positions)
        at_good = order[np.searchsorted(positions[order], good)]
        at_bad = order[np.searchsorted(positions[order], bad)]
        writer.write(pair_table(rows, job.cfg, at_good, at_bad, good_reward, bad_reward))
        del rows, parts
        for file in files:
            file.unlink()
        bar.update(len(good))
    writer.close()
    bar.close()
    return writer.rows


# ------------------------------------------------------------------------------------------ main


# the dataclasses a recipe of this stage fills (tests/test_configs.py parses every shipped recipe with them)
CONFIG_CLASSES = (PrepareConfig,)


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = parse_stage_args(CONFIG_CLASSES, argv, "prepare")

    started = time.time()
    views = {v.strip() for v in cfg.views.split(",") if v.strip()}
    if not views <= {"rl", "sft", "pairs"} or not views:
        raise PipelineError(f"views must be a comma-separated subset of rl,sft,pairs, got {cfg.views!r}")
    if cfg.reward_clip:
        parse_clip(cfg.reward_clip)
    if not 0 <= cfg.eval_fraction < 1:
        raise PipelineError(f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.max_text_bytes < 1:
        raise PipelineError(f"max_text_bytes must be >= 1, got {cfg.max_text_bytes}")
    if cfg.max_length is not None and not cfg.tokenizer_name_or_path:
        raise PipelineError("max_length needs tokenizer_name_or_path (the length is counted in its tokens)")
    out = Path(cfg.output_dir)
    if out.exists() and not cfg.overwrite:
        raise PipelineError(f"output_dir '{out}' exists; choose another or pass --overwrite true")
    files = resolve_files(cfg.data_path, "data_path")
    outputs.check_replaceable(out, "prepare", [*files, cfg.tokenizer_name_or_path])

    tok_fingerprint = None
    if cfg.tokenizer_name_or_path:
        from pipeline.tokenization import tokenizer_fingerprint

        check_model_dir(cfg.tokenizer_name_or_path, "tokenizer_name_or_path")
        try:
            tokenizer = load_tokenizer(cfg.tokenizer_name_or_path)
        except Exception as err:
            raise PipelineError(
                f"tokenizer_name_or_path '{cfg.tokenizer_name_or_path}': cannot load ({err})"
            ) from None
        tok_fingerprint = tokenizer_fingerprint(tokenizer)

    # pass 1: validate everything and decide each row's fate before writing anything
    sources = open_sources(files)
    for path, schema, _ in sources:
        check_schema(path, schema, cfg)
    rows_in = sum(rows for _, _, rows in sources)
    if rows_in == 0:
        raise PipelineError(f"{cfg.data_path}: no rows")
    # every pass (validate; clean, length filter, views; pairs read back) runs in `num_proc` processes over
    # disjoint rows
    units = work_units(sources)
    num_proc = cfg.num_proc or (min(2, os.cpu_count() or 1) if rows_in >= 200_000 else 1)
    num_proc = max(1, min(num_proc, len(units)))
    with worker_pool(num_proc) as pool:
        index = scan_rows(sources, units, cfg, pool, num_proc - 1)
        seconds = {"scan": time.time() - started}
        pa.default_memory_pool().release_unused()  # pass 1's batches are gone; give their memory back
        drops: dict[str, int] = {"duplicate_uid": int(index.duplicate.sum()),
                                 "text_too_large": int((index.too_large & ~index.duplicate).sum())}  # fmt: skip
        keep = ~index.duplicate & ~index.too_large
        rewards = transform_rewards(index, keep, cfg)
        kept = apply_datafilter(index, rewards, keep, cfg)
        drops[f"datafilter_{cfg.datafilter}"] = int(keep.sum() - kept.sum())
        keep = kept
        is_eval = split_of(index.prompt_keys, cfg.eval_fraction)

        plan = RowPlan(keep, rewards, index.prompt_keys, is_eval)
        with outputs.replacing(out, "prepare", [*files, cfg.tokenizer_name_or_path]) as tmp:
            # per-process shard names; zero-padded so that they sort in row order
            prefixes = [f"w{k:03d}-" if num_proc > 1 else "" for k in range(num_proc)]
            # pairs whose rows are far apart are read back from the rl view's cleaned rows in pass 3: written
            # aside when not asked for
            written = sorted(views | ({"rl"} if "pairs" in views else set()))
            # without a length filter the pairs are known now (ids and rewards alone), and pass 2 writes those
            # whose two rows it reads together
            early = "pairs" in views and cfg.max_length is None
            good, bad = choose_pairs(index.prompt_keys, rewards, keep, cfg) if early else (None, None)
            jobs = []
            for k, part in enumerate(split_evenly(units, num_proc)):
                share = None
                if early:
                    lo, hi = np.searchsorted(np.minimum(good, bad), [part[0][2], part[-1][2] + part[-1][3]])
                    share = (good[lo:hi], bad[lo:hi])
                jobs.append(ViewsJob(cfg, written, str(tmp), prefixes[k], part, plan, share))
            results = run_jobs(write_views, jobs, pool, "prepare", rows_in)
            seconds["views"] = time.time() - started - sum(seconds.values())
            rows_out = {key: sum(r["rows"][key] for r in results) for key in results[0]["rows"]}
            too_long = np.concatenate([r["too_long"] for r in results])
            drops["too_long"] = len(too_long)
            keep[too_long] = False
            if not keep.any():
                raise PipelineError(f"{cfg.data_path}: zero rows left after filtering (drops: {drops})")
            if "pairs" in views:
                # pass 3: the other pairs (all of them after a length filter); only their rows' text is read back
                if early:
                    done = np.zeros(len(good), dtype=bool)
                    first_pair = 0
                    for job, result in zip(jobs, results, strict=True):
                        done[result["pairs_written"] + first_pair] = True
                        first_pair += len(job.pairs[0])
                    good, bad = good[~done], bad[~done]
                else:
                    good, bad = choose_pairs(index.prompt_keys, rewards, keep, cfg)
                # pass 3, as a join that reads the rl shards once: (a) each process streams its share of the
                # rl row groups and appends every paired row to its pair's bucket file, (b) each bucket of
                # PAIRS_PER_BUCKET pairs is assembled from its files and written
                work = tmp / ".pairs-work"
                work.mkdir()
                scatter_jobs, gather_jobs = [], []
                for split, held_out in (("train", False), ("eval", True)):
                    mine = np.flatnonzero(is_eval[good] == held_out)
                    if not len(mine):
                        continue
                    position = np.cumsum(keep & (is_eval == held_out)) - 1  # row -> index in the split's rl
                    g, b = position[good[mine]], position[bad[mine]]
                    g_reward, b_reward = rewards[good[mine]], rewards[bad[mine]]
                    bucket = np.arange(len(mine)) // PAIRS_PER_BUCKET
                    rows = np.concatenate([g, b])
                    by_row = np.argsort(rows)
                    rows, row_bucket = rows[by_row], np.concatenate([bucket, bucket])[by_row]
                    units = work_units([(f, None, 0) for f in prepared_shards(tmp, "rl", split)])
                    for k, part in enumerate(split_evenly(units, num_proc)):
                        lo, hi = np.searchsorted(rows, [part[0][2], part[-1][2] + part[-1][3]])
                        scatter_jobs.append(ScatterJob(cfg, str(work), f"w{k:03d}", split, part, rows[lo:hi],
                                                       row_bucket[lo:hi]))  # fmt: skip
                    cuts = [
                        slice(i * PAIRS_PER_BUCKET, (i + 1) * PAIRS_PER_BUCKET) for i in range(bucket[-1] + 1)
                    ]
                    for k, share in enumerate(split_evenly(list(enumerate(cuts)), num_proc)):
                        buckets = [(i, g[c], b[c], g_reward[c], b_reward[c]) for i, c in share]
                        gather_jobs.append(GatherJob(cfg, str(tmp), str(work), prefixes[k], split, buckets))
                run_shared(scatter_pair_rows, scatter_jobs, pool, num_proc - 1)
                for job, pairs in zip(
                    gather_jobs, run_shared(gather_pairs, gather_jobs, pool, num_proc - 1), strict=True
                ):
                    rows_out[f"pairs_{job.split}"] += pairs
                shutil.rmtree(work)
                seconds["pairs"] = time.time() - started - sum(seconds.values())
            if "rl" not in views:
                shutil.rmtree(tmp / "rl")
            rows_out = {k: v for k, v in rows_out.items() if k.split("_")[0] in views}
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "stage": "prepare",
                "sources": [
                    {"path": os.path.abspath(p), "rows": r, "sha256": sha256_file(p)} for p, _, r in sources
                ],
                "rows_in": rows_in,
                "rows_out": rows_out,
                "drops": drops,
                "config": asdict(cfg),
                "tokenizer_fingerprint": tok_fingerprint,
                "columns": {
                    "reward": cfg.reward_output_key,
                    "response": cfg.response_key,
                    "raw_reward": raw_reward_column(cfg),
                },
                "seconds": round(time.time() - started, 3),
                "seconds_by_pass": {name: round(value, 3) for name, value in seconds.items()},
            }
            atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    logger.info("prepare: %d rows in, %s out, drops %s -> %s", rows_in, rows_out, drops, out)
    print(json.dumps({"output_dir": str(out), "rows_in": rows_in, "rows_out": rows_out, "drops": drops}))
    return manifest
