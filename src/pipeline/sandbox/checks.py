"""What a sandboxed execution is asked (the checks: assert tests, HumanEval, stdin/stdout; the limits) and what it answers (ExecResult)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import PipelineError

MAX_OUTPUT_CHARS = 4096


class SandboxUnavailable(PipelineError):
    """The sandbox failed to run a program on every attempt: nothing can be scored until it works."""


@dataclass(frozen=True)
class AssertTests:
    """Assert statements (MBPP's `test_list`, the synthetic task's `tests`), each run on its own, after the
    trusted `setup` code (MBPP's `test_setup_code`). Every name they call but do not define is the
    candidate's function of that name; the result counts the statements that passed."""

    tests: tuple[str, ...]
    setup: str = ""


@dataclass(frozen=True)
class HumanEvalTest:
    """HumanEval's `test` (defining `check(candidate)`) run against the candidate's `entry_point`. The
    trusted `prompt` runs in the checker first, so the test's helpers (e.g. `poly` of HumanEval/32) exist."""

    test: str
    entry_point: str
    prompt: str = ""


@dataclass(frozen=True)
class StdioTests:
    """The whole program run once per input on stdin; its stdout must equal the output (compared as
    whitespace-separated tokens) in the checker."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


Check = AssertTests | HumanEvalTest | StdioTests


def as_check(check) -> Check:
    """A check, or a list of assert statements (the shape the synthetic task and `tests` columns use)."""
    if isinstance(check, (AssertTests, HumanEvalTest, StdioTests)):
        return check
    if check is None:
        raise TypeError("a sandboxed run needs a check: there is no whole-program verdict")
    if isinstance(check, str):
        raise TypeError("tests must be a list of statements, not one string")
    return AssertTests(tuple(str(t) for t in check))


def checks_payload(check: Check) -> dict:
    if isinstance(check, AssertTests):
        return {"kind": "asserts", "tests": list(check.tests), "setup": check.setup}
    if isinstance(check, HumanEvalTest):
        return {
            "kind": "humaneval",
            "test": check.test,
            "entry_point": check.entry_point,
            "prompt": check.prompt,
        }
    if len(check.inputs) != len(check.outputs):
        raise ValueError(f"{len(check.inputs)} inputs but {len(check.outputs)} outputs")
    return {
        "kind": "stdio",
        "inputs": [str(x) for x in check.inputs],
        "outputs": [str(x) for x in check.outputs],
    }


def total_checks(check: Check) -> int:
    if isinstance(check, AssertTests):
        return len(check.tests)
    return 1 if isinstance(check, HumanEvalTest) else len(check.inputs)


@dataclass(frozen=True)
class Limits:
    """Resource limits of each sandboxed process (the wall-clock timeout is an argument of the run functions).

    ``cpu_seconds`` None means ``ceil(timeout) + 1``. ``max_processes`` counts the candidate's processes and
    threads (RLIMIT_NPROC); it holds in the namespaces tier and, for non-root users, in the basic tier.
    """

    memory_bytes: int = 1024**3
    file_size_bytes: int = 16 * 1024**2
    work_dir_bytes: int = 64 * 1024**2  # the work dir is a tmpfs of this size (namespaces tier)
    max_processes: int = 16
    cpu_seconds: int | None = None
    max_output_chars: int = MAX_OUTPUT_CHARS


@dataclass
class ExecResult:
    """Outcome of one execution, as the checker decided it.

    ``status``: "passed" (every test passed), "failed" (some test failed), "timeout" (the wall-clock limit was
    hit: tests after it count as failed), "crashed" (the program did not load, or the checker got no
    verdict) or "error" (the sandbox itself could not run it: start, jail or checker failed — never the
    program's doing; the public run functions retry it and then raise `SandboxUnavailable`). ``passed``/``total``: tests (HumanEval: 1). ``failed_tests``: indices of the tests that failed.
    ``error`` is a one-line reason (the first failure: the failing line, or the input and the wrong output)
    and ``elapsed`` the wall-clock seconds; these three do not take part in ``==``. stdout/stderr are the
    candidate's and the test code's output, truncated: shown to people, never read for the verdict.
    """

    status: str
    passed: int
    total: int
    stdout: str
    stderr: str
    error: str = field(default="", compare=False)
    elapsed: float = field(default=0.0, compare=False)
    failed_tests: tuple[int, ...] = field(default=(), compare=False)

    @property
    def fraction(self) -> float:
        """Share of tests passed (0.0 when there are no tests)."""
        return self.passed / self.total if self.total else 0.0
