"""Output shards: parquet files of a view and split, rotated at shard_rows, under temporary names."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.stages.prepare.config import PrepareConfig

logger = logging.getLogger("pipeline.prepare")


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
