"""Work units over row groups and the process pool every pass shares."""

from __future__ import annotations

import contextlib
import logging
import os
import time

import pyarrow.parquet as pq

logger = logging.getLogger("pipeline.prepare")


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
