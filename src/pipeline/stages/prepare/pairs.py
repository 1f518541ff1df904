"""Preference pairs: chosen from ids and rewards, and assembled (pass 3) from the rl shards."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.stages.prepare.clean import chat_array, prompt_parts
from pipeline.stages.prepare.config import PROMPT_KEY, PrepareConfig
from pipeline.stages.prepare.read import iter_batches
from pipeline.stages.prepare.shards import ShardWriter

logger = logging.getLogger("pipeline.prepare")


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


def pair_table(rows: pa.Table, cfg: PrepareConfig, at_good, at_bad, good_reward, bad_reward) -> pa.Table:
    """Preference rows from cleaned rl rows: `rows` holds them, `at_good`/`at_bad` index the two sides. A pair
    whose two answers are the same text (after cleaning) is left out: it teaches nothing but noise, and an
    RM or DPO loss on it pushes one text two ways (`choose_pairs` cannot see texts; the manifest counts
    these under drops.identical_pairs)."""
    responses = rows.column(cfg.response_key)
    distinct = pc.not_equal(responses.take(pa.array(at_good)), responses.take(pa.array(at_bad)))
    distinct = pc.fill_null(distinct, True).to_numpy(zero_copy_only=False)
    if not distinct.all():
        at_good, at_bad = np.asarray(at_good)[distinct], np.asarray(at_bad)[distinct]
        good_reward, bad_reward = np.asarray(good_reward)[distinct], np.asarray(bad_reward)[distinct]
    at_good, at_bad = pa.array(at_good), pa.array(at_bad)
    user, prefix = prompt_parts(rows.column(PROMPT_KEY).take(at_good))
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
