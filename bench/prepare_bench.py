"""Throughput and peak memory of `pipeline prepare` on synthetic reward-keyed rows.

    .venv/bin/python bench/prepare_bench.py [--rows 1000000] [--response_bytes 2000] [--layout grouped|shuffled]
        [--views rl,sft,pairs] [--workdir /tmp/prepare_bench]

Writes a parquet of `--rows` rows (users' schema, fenced ~2 KB responses, 8 responses per prompt) in row
groups: `grouped` keeps a prompt's responses together, as logged RL data is; `shuffled` scatters them over
the file (the worst case for the pairs view, whose pairs are then read back in a third pass). Then runs `pipeline prepare` on it in a child process and reports rows/s, the peak RSS of its
largest process, and the peak of the summed RSS of the stage and its worker processes.
The stage's own time (from its manifest) excludes the ~5 s of interpreter and library start-up.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def make_data(path: Path, rows: int, response_bytes: int, shuffled: bool, chunk: int = 50_000) -> None:
    line = "    total = total + compute(value, index)  # accumulate\n"
    body = line * max(1, response_bytes // len(line))
    rng = np.random.default_rng(0)
    order = np.random.default_rng(1).permutation(rows) if shuffled else np.arange(rows)
    schema = pa.schema([("uid", pa.string()), ("prompt_pretokenized", pa.string()),
                        ("unprocessed_response", pa.string()), ("normalized_reward", pa.float64())])  # fmt: skip
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            ids = order[start : start + n]
            prompts = [
                json.dumps([{"role": "user", "content": f"Write function number {i // 8}."}]) for i in ids
            ]
            responses = [f"```python\ndef f_{i}(value):\n{body}    return total\n```" for i in ids]
            rewards = rng.uniform(-1, 1, n)
            writer.write_table(pa.table([[f"u{i}" for i in ids], prompts, responses, rewards], schema=schema))


def sample_tree_rss(proc: subprocess.Popen, every: float = 0.02) -> float:
    """Peak of the summed RSS of `proc` and its descendants (GiB), sampled until it exits."""
    import psutil

    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:  # a worker exited between listing and reading
            continue
        peak = max(peak, total)
        time.sleep(every)
    return peak / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--response_bytes", type=int, default=2000)
    parser.add_argument("--workdir", default="/tmp/prepare_bench")
    parser.add_argument("--views", default="rl,sft,pairs")
    parser.add_argument("--layout", choices=["grouped", "shuffled"], default="grouped")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.layout == "grouped" else "_shuffled"
    data = work / f"rows_{args.rows}_{args.response_bytes}{suffix}.parquet"
    if not data.exists():
        t0 = time.time()
        make_data(data, args.rows, args.response_bytes, args.layout == "shuffled")
        print(f"made {data} ({data.stat().st_size / 2**30:.2f} GiB) in {time.time() - t0:.1f} s")
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline.cli", "prepare", "--data_path", str(data), "--output_dir", str(out),
           "--views", args.views, "--datafilter", "none"]  # fmt: skip
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak_total = sample_tree_rss(proc)  # the stage and its worker processes together
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed with exit status {proc.returncode}")
    wall = time.time() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    manifest = json.loads((out / "manifest.json").read_text())
    stage = manifest["seconds"]
    print(json.dumps({
        "rows": args.rows, "response_bytes": args.response_bytes, "layout": args.layout, "views": args.views,
        "wall_s": round(wall, 2), "stage_s": stage, "stage_s_by_pass": manifest["seconds_by_pass"],
        "rows_per_s_wall": round(args.rows / wall), "rows_per_s_stage": round(args.rows / stage),
        "peak_rss_gib_largest_process": round(peak_gib, 3), "peak_rss_gib_all_processes": round(peak_total, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
