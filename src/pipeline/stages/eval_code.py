"""Functional correctness of code samples in the sandbox, and the unbiased pass@k estimate.

    pipeline eval-code --samples samples.jsonl --problems HumanEval.jsonl.gz --k 1,10 --timeout 3

Problems are JSON lines (optionally gzipped) with a ``task_id`` and the fields of one sandbox format
(:mod:`pipeline.sandbox.problems`): HumanEval (``prompt``, ``test``, ``entry_point``), MBPP (``text``,
``code``, ``test_list``), the synthetic task (``prompt``, ``tests``) or stdin/stdout (``inputs``/``outputs``).
Samples have ``task_id`` and ``completion``; the other keys are kept. Each sample is loaded by a candidate
sandbox (HumanEval: ``prompt + completion``) and judged by a separate checker process running the
problem's tests (:mod:`pipeline.sandbox`): it passes iff every test ran to its end with every call
answered in plain data. ``<samples>_results.jsonl`` gets every sample with ``passed`` and ``result`` (``passed``,
``timed out`` or ``failed: <reason>``). The file is written under a temporary name and renamed when
complete. The last line on stdout is a JSON object with ``pass@k`` for every k.

pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k) per problem (n samples, c correct), averaged
over every problem evaluated, so all the reported ks describe the same problems. A k above the smallest
number of samples a problem has is not reported (null), and ``not_reported`` says why. Each pass@k comes
with a 95% interval over problems (``pass@k_ci_low``/``_ci_high``; ``pass@k_interval`` names it): Wilson's
score interval when every problem's value is 0 or 1 (one sample each), else a seeded percentile bootstrap
over problems. A sample the sandbox itself could not run is retried, then the run stops with an error: it
is never counted as the model's failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.sandbox import ExecResult, Limits, isolation, run_many
from pipeline.sandbox.problems import check_for, program_for
from pipeline.stats import INTERVAL_NAMES, estimate_pass_at_k
from pipeline.tasks.code_problems import load_problem_records, read_jsonl

SAMPLE_KEYS = ("task_id", "completion")


def _require(obj: dict[str, Any], keys: Sequence[str], path: str | os.PathLike, lineno: int) -> None:
    for key in keys:
        if key not in obj:
            raise PipelineError(f"{path}:{lineno}: missing key '{key}'")
        if not isinstance(obj[key], str):
            raise PipelineError(
                f"{path}:{lineno}: key '{key}' must be a string, got {type(obj[key]).__name__}"
            )


def load_problems(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """task_id -> problem, each in one of the sandbox's formats (checked here, one line per problem)."""
    return load_problem_records(path, "--problems")


def load_samples(
    path: str | os.PathLike, problems: dict[str, dict[str, Any]], problems_path: str
) -> list[dict]:
    samples = []
    for lineno, obj in read_jsonl(path, "--samples"):
        _require(obj, SAMPLE_KEYS, path, lineno)
        if obj["task_id"] not in problems:
            raise PipelineError(
                f"{path}:{lineno}: key 'task_id': '{obj['task_id']}' is not in problems file '{problems_path}'"
            )
        samples.append(obj)
    if not samples:
        raise PipelineError(f"{path}: no samples in the file")
    return samples


def result_text(res: ExecResult) -> str:
    """HumanEval's ``result`` strings: "passed", "timed out", "failed: <reason>"."""
    if res.status == "passed":
        return "passed"
    if res.status == "timeout":
        return "timed out"
    return f"failed: {res.error or res.status}"


def _write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def evaluate(
    samples_path: str,
    problems_path: str,
    ks: Sequence[int] = (1, 10),
    timeout: float = 3.0,
    workers: int | None = None,
    limits: Limits | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every sample, write ``<samples>_results.jsonl``, and return the pass@k summary."""
    problems = load_problems(problems_path)
    samples = load_samples(samples_path, problems, problems_path)
    jobs = []
    for s in samples:
        p = problems[s["task_id"]]
        jobs.append((program_for(p, s["completion"]), check_for(p)))
    results = run_many(
        jobs,
        timeout=timeout,
        workers=workers,
        limits=limits,
        progress="executing samples" if progress else None,
    )
    counts: dict[str, tuple[int, int]] = {}
    rows = []
    for sample, res in zip(samples, results, strict=True):
        n, c = counts.get(sample["task_id"], (0, 0))
        counts[sample["task_id"]] = (n + 1, c + (res.status == "passed"))
        rows.append({**sample, "result": result_text(res), "passed": res.status == "passed"})
    results_path = Path(f"{samples_path}_results.jsonl")  # HumanEval's naming: samples.jsonl_results.jsonl
    _write_jsonl_atomic(results_path, rows)
    summary = estimate_pass_at_k(counts, ks)
    summary.update(
        {
            "num_samples": len(samples),
            "num_passed": sum(row["passed"] for row in rows),
            "num_problems": len(counts),
            "problems_without_samples": len(problems) - len(counts),
            "timeout": timeout,
            "sandbox": isolation().tier,
            "results": str(results_path),
        }
    )
    return summary


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got '{text}'"
        ) from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got '{text}'")
    return sorted(set(ks))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="pipeline eval-code",
        description=__doc__.split("\n\n")[0],
        epilog="example:\n" + __doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--samples", required=True, help="JSON lines with task_id and completion")
    parser.add_argument(
        "--problems",
        required=True,
        help="JSON lines (.jsonl or .jsonl.gz): task_id and a problem in HumanEval, MBPP, synthetic or "
        "stdin/stdout format",
    )
    parser.add_argument(
        "--k", type=_parse_ks, default=[1, 10], help="comma-separated k values (default: 1,10)"
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="wall-clock seconds per sample (default: 3)"
    )
    parser.add_argument("--workers", type=int, default=None, help="parallel executions (default: CPU count)")
    parser.add_argument(
        "--memory_mb",
        type=int,
        default=Limits.memory_bytes // 2**20,
        help="address-space limit per sandboxed process, MiB (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
    summary = evaluate(
        args.samples,
        args.problems,
        ks=args.k,
        timeout=args.timeout,
        workers=args.workers,
        limits=Limits(memory_bytes=args.memory_mb * 2**20),
    )
    print(f"problems evaluated: {summary['problems']} ({summary['num_samples']} samples)", file=sys.stderr)
    for k in args.k:
        if summary.get(f"pass@{k}") is not None and summary.get(f"pass@{k}_ci_low") is not None:
            how = INTERVAL_NAMES[summary[f"pass@{k}_interval"]]
            print(f"pass@{k}: {summary[f'pass@{k}']:.4f} [{summary[f'pass@{k}_ci_low']:.4f}, "
                  f"{summary[f'pass@{k}_ci_high']:.4f}] ({how}, {summary['problems']} problems)", file=sys.stderr)  # fmt: skip
    for key, why in summary["not_reported"].items():
        print(f"{key}: not reported: {why}", file=sys.stderr)
    print(f"results: {summary['results']}", file=sys.stderr)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
