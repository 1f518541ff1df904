"""Sandboxed execution of untrusted programs (model-generated code), judged by a checker they cannot reach.

Every code reward and pass rate in the project comes from here: `eval-code`, `eval`'s code scorer, the
GRPO/RLOO/PPO rewards (`pipeline.rewards`), greedy pass rates (only the synthetic task's labels of its own
template-built solutions are scored in-process).

**Threat model.** The program under test is hostile: an RL policy optimises whatever earns reward, so any
way for the program to make a failing test look passed will be found. Known forgeries against checking in
the program's own interpreter: objects whose `__eq__`/ordering/hash always agree, patched builtins or
`AssertionError`, frame and `gc` walks that rewrite the harness, trace functions or threads swapping
`check`, `atexit`/`os._exit(0)`/`excepthook`, printing what a harness parses.

**The verdict path** (`harness.py`). Two processes per execution:
- the *candidate* loads the program and answers requests over a pipe: "call f with these arguments" or
  "run the whole program on this stdin". Arguments, return values, arguments changed in place and stdout
  cross as plain data only (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset,
  nested), decoded by a decoder that can build nothing else — never pickle;
- the *checker* runs the problem's own test code (trusted: from the dataset) with the candidate's functions
  bound to proxies, and alone holds the descriptor its report leaves on. A test passes when it runs to its
  end without an exception and every call it made was answered; a call answered with another type, a
  crash, a timeout or a dead candidate fails the test even if the test code catches exceptions. What the
  candidate prints, writes or how it exits never reaches the verdict. The candidate is forked before the
  checks are read, so it never holds the tests or the expected outputs.

**A sandbox failure is not the program's.** The candidate says it reached its jail before the program is
loaded (so the program can neither forge nor withhold it); a sandbox that could not start, build its jail,
put the candidate in it or run the checker reports status "error". The run functions retry it in a fresh
sandbox, 3 attempts in all, then raise `SandboxUnavailable`: such a sample is never scored as a failure.
(A checker that ends without a verdict stays "crashed": in the basic tier the candidate can kill it.)

Problem formats (`problems.py`, detected from a record's fields): HumanEval (`prompt`, `test`,
`entry_point`: `HumanEvalTest`), MBPP (`text`, `code`, `test_list`, `test_setup_code`) and the synthetic task
(`tests`): `AssertTests`, the function names taken from the tests; stdin/stdout (`inputs`/`outputs`, or
APPS' `input_output`): `StdioTests`, stdout compared as whitespace-separated tokens.

**Containment, "namespaces" tier** (Linux, run as root, util-linux `unshare`; what the project's machines
give; `isolation()` reports what this machine gives):
- process tree: `unshare --pid --fork` makes the harness PID 1 of a fresh PID namespace; when it exits the
  kernel kills everything left there. The parent kills the process group at the timeout; PID 1 stops on
  its own `timeout + 2` s after it starts;
- identity: candidate and checker each run under a fresh random uid (2**30 to 2**31), no groups,
  `no_new_privs`; the checker is not dumpable. So the candidate cannot signal, ptrace or read the memory
  of the checker, the parent or another sandbox, and RLIMIT_NPROC (which does not bind root) caps its fork
  storms per execution;
- filesystem: both processes are chrooted into a jail: a tmpfs holding read-only binds of the Python
  installation and the system libraries, `/dev/null`, `/dev/urandom`, the namespace's own `/proc`, and one
  empty writable work directory each (0700, its own uid). No other file of the machine is visible;
- network: `unshare --net`: only a loopback that is down;
- resources (`Limits`): CPU seconds, address space, file size (which also caps stdout/stderr), no core
  files, `max_processes` tasks; `oom_score_adj` 1000. Filling the work dir, a 1,500-deep tree or a fork
  storm costs only that execution;
- environment: `PATH`, `LANG`, `TMPDIR` only; stdin `/dev/null`; `python -I -B`.

**"basic" tier** (not root, not Linux, no working `unshare`, or `PIPELINE_SANDBOX_ISOLATION=basic`): the
same two-process verdict, rlimits, environment and temporary directories, all under the caller's own
uid. It does NOT contain network access, reading the user's files, writes outside the work dir, processes
that leave the process group, or a program that attacks the calling process itself (same uid: signals,
`/proc/<parent>/fd`). The checker and supervisor are not dumpable, so the candidate cannot ptrace them or
open their descriptors; it can still kill them, which fails the execution. A warning is logged once.

Limits of the design: memory is capped per process (RLIMIT_AS), not per execution (no cgroup: the memory
cgroup belongs to the job runner here); a test that passes the candidate a non-plain argument (a lambda)
cannot cross and fails; a function returning its own class's objects fails (only plain data crosses).
"""

from pipeline.sandbox.checks import (
    MAX_OUTPUT_CHARS,
    AssertTests,
    Check,
    ExecResult,
    HumanEvalTest,
    Limits,
    SandboxUnavailable,
    StdioTests,
    as_check,
)
from pipeline.sandbox.fence import code_fence_span, strip_code_fence
from pipeline.sandbox.pool import run_check, run_humaneval, run_many, run_stdio, run_tests
from pipeline.sandbox.runner import Isolation, isolation

__all__ = [
    "MAX_OUTPUT_CHARS",
    "AssertTests",
    "Check",
    "ExecResult",
    "HumanEvalTest",
    "Isolation",
    "Limits",
    "SandboxUnavailable",
    "StdioTests",
    "as_check",
    "code_fence_span",
    "isolation",
    "run_check",
    "run_humaneval",
    "run_many",
    "run_stdio",
    "run_tests",
    "strip_code_fence",
]
