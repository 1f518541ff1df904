"""Sandbox throughput: executions per second with N workers, on a fixed set of short programs.

    .venv/bin/python bench/sandbox_bench.py                      # workers 1,2,4; both isolation tiers
    .venv/bin/python bench/sandbox_bench.py --jobs 200 --workers 1,2,4,8 --tiers auto

Each execution is a fresh sandbox (interpreter start, namespaces, limits, teardown), and the programs
themselves take about a millisecond, so the figure is the per-execution overhead. ``auto`` is the
strongest tier this machine supports (``namespaces`` as root on Linux); ``basic`` is the fallback without
namespaces, to show what isolation costs. Every result is checked against the expected status.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from pipeline.sandbox import isolation, run_many

ADD = "def add(a, b):\n    return a + b\n"
REV = "def rev(s):\n    return s[::-1]\n"
JOBS: list[tuple[str, list[str] | None, str]] = [
    (ADD, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], "passed"),
    (REV, ["assert rev('abc') == 'cba'", "assert rev('') == ''"], "passed"),
    ("def add(a, b):\n    return a - b\n", ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "failed"),
    ("def rev(s)\n    return s\n", ["assert rev('ab') == 'ba'"], "crashed"),
    (ADD + "assert add(2, 2) == 4\n", None, "passed"),
    ("import math\nassert math.isqrt(17) == 4\nprint(sum(range(1000)))\n", None, "passed"),
    (REV + "assert rev('ab') == 'ab'\n", None, "failed"),
    (
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
        ["assert fib(15) == 610"],
        "passed",
    ),
]


def bench(n_jobs: int, workers: int, timeout: float) -> float:
    jobs = [JOBS[i % len(JOBS)] for i in range(n_jobs)]
    start = time.perf_counter()
    results = run_many([(program, tests) for program, tests, _ in jobs], timeout=timeout, workers=workers)
    seconds = time.perf_counter() - start
    wrong = [
        (want, res.status) for (_, _, want), res in zip(jobs, results, strict=True) if res.status != want
    ]
    if wrong:
        raise SystemExit(f"unexpected results (expected, got): {wrong[:5]}")
    return seconds


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=96, help="executions per measurement (default 96)")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (default 1,2,4)")
    parser.add_argument("--tiers", default="auto,basic", help="isolation tiers to measure: auto, basic")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]

    print(
        f"# sandbox throughput: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, {args.jobs} executions per row"
    )
    rows = []
    seen_tiers = set()
    for tier in tiers:
        os.environ["PIPELINE_SANDBOX_ISOLATION"] = tier
        iso = isolation()
        if iso.tier in seen_tiers:  # auto fell back to basic: measured already
            continue
        seen_tiers.add(iso.tier)
        if iso.reason:
            print(f"# {iso.tier}: {iso.reason}", file=sys.stderr)
        bench(len(workers) * 2, max(workers), args.timeout)  # warm-up: page cache, probe
        for w in workers:
            seconds = bench(args.jobs, w, args.timeout)
            rows.append({"tier": iso.tier, "workers": w, "seconds": seconds, "per_s": args.jobs / seconds})
    os.environ.pop("PIPELINE_SANDBOX_ISOLATION", None)

    print("| isolation | workers | executions | seconds | executions/s | ms per execution and worker |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        per_exec_ms = 1000 * r["seconds"] * r["workers"] / args.jobs
        print(
            f"| {r['tier']} | {r['workers']} | {args.jobs} | {r['seconds']:.2f} | {r['per_s']:.1f} | "
            f"{per_exec_ms:.0f} |"
        )
    return rows


if __name__ == "__main__":
    main()
