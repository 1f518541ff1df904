"""Reading the inputs: sources, batches of one row group, schema checks, the first bad row named."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.stages.prepare.config import PROMPT_KEY, PrepareConfig, raw_column_name

logger = logging.getLogger("pipeline.prepare")


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


def first_bad(mask: np.ndarray, uids: list[str] | pa.Array, offset: int) -> str:
    i = int(np.flatnonzero(mask)[0])
    uid = uids[i].as_py() if isinstance(uids, (pa.Array, pa.ChunkedArray)) else uids[i]
    return f"row {offset + i}, uid {uid!r}"


def first_null(column: pa.Array) -> int:
    return int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
