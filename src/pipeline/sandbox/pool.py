"""The public entry points: one execution, or many through a warm pool of sandboxes (each worker's next one starts while the current one runs)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

from pipeline.sandbox.checks import (
    AssertTests,
    Check,
    ExecResult,
    HumanEvalTest,
    Limits,
    SandboxUnavailable,
    StdioTests,
    as_check,
    checks_payload,
)
from pipeline.sandbox.runner import Sandbox, isolation

logger = logging.getLogger("pipeline.sandbox")

SANDBOX_ATTEMPTS = 3  # a sandbox that could not run a program is replaced this many times in all


def run_in_sandboxes(sandboxes, program: str, check: Check) -> ExecResult:
    """Run in the first sandbox ``sandboxes`` yields; when the sandbox itself failed (status "error": it
    could not start, set up its jail or run the checker), in a fresh one, up to `SANDBOX_ATTEMPTS` in all.
    Then `SandboxUnavailable`: a sandbox failure is never scored as the program's."""
    for attempt, sandbox in enumerate(sandboxes, 1):
        result = sandbox.run(program, check)
        if result.status != "error":
            return result
        logger.warning("sandbox attempt %d/%d failed: %s", attempt, SANDBOX_ATTEMPTS, result.error)
        if attempt >= SANDBOX_ATTEMPTS:
            break
    raise SandboxUnavailable(
        f"the sandbox could not run a program {SANDBOX_ATTEMPTS} times in a row (last: {result.error}); "
        "nothing was scored — fix the sandbox (see `pipeline.sandbox`), or set "
        "PIPELINE_SANDBOX_ISOLATION=basic where namespaces cannot work"
    )


def execute(program: str, check: Check, timeout: float, limits: Limits, namespaces: bool) -> ExecResult:
    """One execution in a sandbox started for it (a fresh one again if the sandbox failed)."""
    return run_in_sandboxes(
        (Sandbox(namespaces, limits, timeout) for _ in range(SANDBOX_ATTEMPTS)), program, check
    )


class _WarmPool:
    """Sandboxes started ahead of their jobs, so that an execution does not wait for an interpreter and its
    jail: taking one starts its replacement, which sets up while the taken one runs."""

    def __init__(self, size: int, namespaces: bool, limits: Limits, timeout: float, jobs: int):
        self.args, self.left = (namespaces, limits, timeout), jobs  # never start more than will be used
        self.lock, self.ready = threading.Lock(), []
        with self.lock:
            for _ in range(min(size, jobs)):
                self._start()

    def _start(self) -> None:
        if self.left > 0:
            self.left -= 1
            self.ready.append(Sandbox(*self.args))

    def _take(self) -> Sandbox:
        with self.lock:
            sandbox = self.ready.pop(0) if self.ready else None
            if sandbox is None:
                self.left -= 1
            else:
                self._start()
        return sandbox or Sandbox(*self.args)

    def run(self, program: str, check: Check) -> ExecResult:
        # a failed sandbox is replaced by a freshly started one, not another warm one started alongside it
        first = self._take()
        retries = (Sandbox(*self.args) for _ in range(SANDBOX_ATTEMPTS - 1))
        return run_in_sandboxes(itertools.chain([first], retries), program, check)

    def close(self) -> None:
        with self.lock:
            for sandbox in self.ready:
                sandbox.discard()
            self.ready = []


def run_check(program: str, check, timeout: float = 5.0, limits: Limits | None = None) -> ExecResult:
    """Load ``program`` in a fresh candidate sandbox and judge it by ``check`` in a separate checker."""
    return execute(program, as_check(check), timeout, limits or Limits(), isolation().namespaces)


def run_tests(
    program: str, tests: Sequence[str], timeout: float = 5.0, limits: Limits | None = None, setup: str = ""
) -> ExecResult:
    """Assert statements, each run on its own in the checker (MBPP, the synthetic task); see `AssertTests`."""
    return run_check(program, AssertTests(tuple(str(t) for t in tests), setup), timeout, limits)


def run_humaneval(program: str, test: str, entry_point: str, prompt: str = "", timeout: float = 5.0,
                  limits: Limits | None = None) -> ExecResult:  # fmt: skip
    """HumanEval's verdict: ``check(candidate)`` from ``test`` with the program's ``entry_point``."""
    return run_check(program, HumanEvalTest(test, entry_point, prompt), timeout, limits)


def run_stdio(program: str, inputs: Sequence[str], outputs: Sequence[str], timeout: float = 5.0,
              limits: Limits | None = None) -> ExecResult:  # fmt: skip
    """The program on each stdin; its stdout must match the expected output token for token."""
    return run_check(program, StdioTests(tuple(inputs), tuple(outputs)), timeout, limits)


def run_many(
    jobs: Iterable[tuple[str, object]],
    timeout: float = 5.0,
    workers: int | None = None,
    progress: str | None = None,
    limits: Limits | None = None,
) -> list[ExecResult]:
    """Run ``(program, check)`` jobs on ``workers`` threads (default: CPU count); results in input order.

    ``check``: an `AssertTests`, `HumanEvalTest` or `StdioTests`, or a list of assert statements.
    ``progress``: a label to show a progress bar with (None: no bar). Every execution ends within its
    timeout plus teardown, whatever the program does, so one hostile job cannot stall the pool.
    Identical jobs (the same program text and the same check) run once, and each gets its own copy of that
    one verdict: a policy sampled at a low temperature repeats itself, and every execution costs a fresh
    interpreter and jail (~30 ms of a core). A program whose outcome varies from run to run (timing near
    the timeout, hash-seed-dependent output) thus gets one verdict for all its copies.
    """
    slot_of: dict[tuple[str, str], int] = {}  # (program, the check as sent to the checker) -> its slot
    distinct_jobs: list[tuple[str, Check]] = []
    slots = []
    for program, check in jobs:
        check = as_check(check)
        key = (program, json.dumps(checks_payload(check)))
        if key not in slot_of:
            slot_of[key] = len(distinct_jobs)
            distinct_jobs.append((program, check))
        slots.append(slot_of[key])
    distinct = _run_distinct(distinct_jobs, timeout, workers, progress, limits)
    handed_out: set[int] = set()
    results = []
    for slot in slots:
        results.append(dataclasses.replace(distinct[slot]) if slot in handed_out else distinct[slot])
        handed_out.add(slot)
    return results


def _run_distinct(jobs: list[tuple[str, Check]], timeout: float, workers: int | None, progress: str | None,
                  limits: Limits | None) -> list[ExecResult]:  # fmt: skip
    from tqdm.auto import tqdm

    if not jobs:
        return []
    namespaces = isolation().namespaces  # probe once here rather than in racing worker threads
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    results: list[ExecResult | None] = [None] * len(jobs)
    warm = _WarmPool(workers, namespaces, limits or Limits(), timeout, len(jobs))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
    try:
        futures = {pool.submit(warm.run, program, check): i for i, (program, check) in enumerate(jobs)}
        with tqdm(total=len(jobs), desc=progress, disable=progress is None, unit="run") as bar:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    finally:
        # On an error or Ctrl-C, queued jobs must not start; running ones end within their timeout.
        pool.shutdown(wait=True, cancel_futures=True)
        warm.close()
    return results  # type: ignore[return-value]
