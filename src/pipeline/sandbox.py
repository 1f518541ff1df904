"""Minimal isolated executor for untrusted Python programs checked by ``assert`` tests.

Each call runs a fresh interpreter (``python -I``) in its own temporary directory, new session and
scrubbed environment, under CPU/memory/file-size rlimits and a wall-clock timeout that kills the whole
process group. This is process isolation only (no seccomp, no network or filesystem jail); the API is
deliberately small (:func:`run_tests`, :func:`run_many`, :class:`ExecResult`) so a hardened backend can
replace it later.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["ExecResult", "run_tests", "run_many", "strip_code_fence"]

MAX_OUTPUT_CHARS = 4096
_AS_LIMIT = 2 * 1024**3
_FSIZE_LIMIT = 16 * 1024**2

# The harness source holds no secret: the nonce and the tests arrive in a payload file that the harness
# deletes before the program runs. Everything it needs after the program ran is bound beforehand, so a
# program that monkeypatches os/json/sys cannot rewrite the result line.
_HARNESS = r"""
import os
import sys
import traceback


def _main():
    import json

    path = sys.argv[1]
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    os.remove(path)
    prefix = payload["prefix"]
    program = payload["program"]
    tests = payload["tests"]
    del payload
    write, exit_, dup = os.write, os._exit, os.dup
    out_fd = dup(1)  # survives a program that rebinds or closes sys.stdout
    total = len(tests)
    ns = {"__name__": "__solution__"}  # not "__main__": a main block must not run (stdin is /dev/null)
    exec_ok = True
    try:
        exec(compile(program, "<program>", "exec"), ns)
    except BaseException:
        exec_ok = False
        try:
            traceback.print_exc()
        except BaseException:
            pass
    passed = 0
    if exec_ok:
        for i in range(total):
            try:
                exec(compile(tests[i], "<test %d>" % i, "exec"), ns)
            except BaseException as e:
                try:
                    print("test %d failed: %r: %s" % (i, tests[i], type(e).__name__), file=sys.__stderr__)
                except BaseException:
                    pass
            else:
                passed += 1
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    line = '\n%s {"passed": %d, "total": %d, "exec_ok": %s}\n' % (
        prefix, passed, total, "true" if exec_ok else "false"
    )
    write(out_fd, line.encode("utf-8"))
    exit_(0)  # skip atexit handlers and thread joins the program may have registered


_main()
"""


@dataclass
class ExecResult:
    """Outcome of one :func:`run_tests` call.

    ``status``: "passed" (program ran, every test passed), "failed" (program ran, some test failed),
    "timeout" (wall-clock limit hit) or "crashed" (program did not exec, or the harness died).
    """

    status: str
    passed: int
    total: int
    stdout: str
    stderr: str

    @property
    def fraction(self) -> float:
        """Share of tests passed (0.0 when there are no tests)."""
        return self.passed / self.total if self.total else 0.0


def _lower_limit(which: int, soft: int, hard: int) -> None:
    # Never ask for more than the current hard limit: raising it needs privileges and would fail the spawn.
    cur_hard = resource.getrlimit(which)[1]
    if cur_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, cur_hard), min(hard, cur_hard)
    resource.setrlimit(which, (soft, hard))


def _set_limits(cpu_seconds: int) -> None:
    # Runs in the child between fork and exec: only calls into the already-imported resource module.
    _lower_limit(resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1)  # SIGXCPU first, SIGKILL 1 s later
    _lower_limit(resource.RLIMIT_AS, _AS_LIMIT, _AS_LIMIT)
    _lower_limit(resource.RLIMIT_FSIZE, _FSIZE_LIMIT, _FSIZE_LIMIT)
    _lower_limit(resource.RLIMIT_CORE, 0, 0)  # SIGXCPU/SIGXFSZ must not leave core files


def _truncate(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    """Keep head and tail (a traceback's useful part is at the end)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n...[{len(text) - 2 * half} chars truncated]...\n{text[-half:]}"


def _wait_without_reaping(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait until ``proc`` exits but leave it a zombie, so its pid (= process group id) cannot be reused
    before we kill the group. Returns False on timeout."""
    if not hasattr(os, "waitid"):  # e.g. macOS: Popen.wait reaps, so the later group kill is best-effort
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return True
    delay = 0.001
    while True:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.01)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # group already gone
        os.killpg(pgid, signal.SIGKILL)


def _parse_result(stdout: str, prefix: str, total: int) -> tuple[dict | None, str]:
    """Return the harness's result (last line carrying the nonce) and stdout without result lines."""
    result = None
    found = False
    kept = []
    for line in stdout.split("\n"):
        if line.startswith(prefix + " "):
            found = True
            try:
                result = json.loads(line[len(prefix) + 1 :])
            except ValueError:
                result = None
        else:
            kept.append(line)
    if not isinstance(result, dict):
        result = None
    if result is not None:
        passed = result.get("passed")
        ok = (
            isinstance(passed, int)
            and result.get("total") == total
            and 0 <= passed <= total
            and isinstance(result.get("exec_ok"), bool)
        )
        if not ok:
            result = None
    cleaned = "\n".join(kept)
    # The harness prefixes its line with "\n"; drop that artefact rather than change program output.
    if found and (cleaned.endswith("\n\n") or cleaned == "\n"):
        cleaned = cleaned[:-1]
    return result, cleaned


def run_tests(program: str, tests: list[str], timeout: float = 5.0) -> ExecResult:
    """Exec ``program`` in a fresh sandboxed interpreter, then run each test statement separately.

    Tests share the program's namespace; a test passes when it raises nothing. A timeout reports
    ``passed=0`` even if some tests had passed, since the harness never got to report.
    """
    tests = list(tests)
    total = len(tests)
    prefix = f"__RESULT_{secrets.token_hex(16)}__"
    with tempfile.TemporaryDirectory(prefix="sandbox-") as tmpdir:
        harness = os.path.join(tmpdir, "harness.py")
        payload = os.path.join(tmpdir, "payload.json")
        with open(harness, "w", encoding="utf-8") as f:
            f.write(_HARNESS)
        with open(payload, "w", encoding="utf-8") as f:
            json.dump({"prefix": prefix, "program": program, "tests": tests}, f)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        # Output goes to files, not pipes: RLIMIT_FSIZE then bounds it (and our memory), and stray
        # grandchildren holding a pipe open cannot make us hang.
        out_path = os.path.join(tmpdir, "stdout.txt")
        err_path = os.path.join(tmpdir, "stderr.txt")
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            proc = subprocess.Popen(
                [sys.executable, "-I", harness, payload],
                cwd=tmpdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=err_f,
                start_new_session=True,
                preexec_fn=functools.partial(_set_limits, math.ceil(timeout) + 1),
            )
        try:
            finished = _wait_without_reaping(proc, time.monotonic() + timeout)
        finally:
            # Kill the whole group (also background children of a program that exited normally) while
            # the leader is still an unreaped zombie, then reap it.
            _kill_group(proc.pid)
            proc.wait()
        with open(out_path, "rb") as f:
            stdout = f.read().decode("utf-8", errors="replace")
        with open(err_path, "rb") as f:
            stderr = f.read().decode("utf-8", errors="replace")

    result, stdout = _parse_result(stdout, prefix, total)
    stdout, stderr = _truncate(stdout), _truncate(stderr)
    if not finished:
        return ExecResult("timeout", 0, total, stdout, stderr)
    if result is None or not result["exec_ok"]:
        return ExecResult("crashed", 0, total, stdout, stderr)
    passed = result["passed"]
    return ExecResult("passed" if passed == total else "failed", passed, total, stdout, stderr)


def run_many(
    jobs: list[tuple[str, list[str]]],
    timeout: float = 5.0,
    workers: int | None = None,
    progress: str | None = None,
) -> list[ExecResult]:
    """Run ``(program, tests)`` jobs concurrently; results come back in input order.

    ``progress``: a label to show a progress bar with (None: no bar).
    """
    from tqdm.auto import tqdm

    jobs = list(jobs)
    if not jobs:
        return []
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        results = pool.map(lambda job: run_tests(job[0], job[1], timeout), jobs)
        return list(tqdm(results, total=len(jobs), desc=progress, disable=progress is None, unit="run"))


_OPEN_FENCE = re.compile(r"^(`{3,})[^`]*$")


def strip_code_fence(text: str) -> str:
    """Remove exactly one Markdown code fence enclosing the whole (trimmed) text; else return ``text``.

    Only whole lines are removed (never a character-set strip, which would eat the "r" of ``return``).
    Text with several fenced blocks, or prose around a block, is returned unchanged.
    """
    lines = text.strip().split("\n")
    if len(lines) < 2:
        return text
    opening = _OPEN_FENCE.match(lines[0].rstrip())
    if opening is None:
        return text
    ticks = opening.group(1)
    closing = lines[-1].strip()
    if not (closing.startswith(ticks) and set(closing) == {"`"}):
        return text
    inner = lines[1:-1]
    # A fence line inside means the text is more than one block (e.g. ```a``` prose ```b```).
    if any(line.lstrip().startswith(ticks) for line in inner):
        return text
    return "\n".join(inner)
