"""The trusted parent of every sandboxed execution: start `harness.py` contained, enforce the wall clock,
read the checker's verdict. See the package docstring for the threat model and the tiers."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.sandbox.harness import send

logger = logging.getLogger("pipeline.sandbox")

MAX_OUTPUT_CHARS = 4096
HARNESS = str(Path(__file__).with_name("harness.py"))
_WATCHDOG_GRACE_S = 2.0
_REPORT_GRACE_S = 1.0  # after the timeout, for the checker to report a call that timed out
_IDLE_S = 600.0  # a warm sandbox nobody hands a job to ends by itself after this
# --kill-child: if unshare itself is killed, so is the namespace's init (and with it the namespace)
_UNSHARE_FLAGS = (
    "--net",
    "--pid",
    "--fork",
    "--kill-child",
    "--mount",
    "--mount-proc",
    "--propagation",
    "private",
)
# system libraries the interpreter's extension modules load (bound read-only into the jail when present)
_SYSTEM_LIBRARIES = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache")


# ------------------------------------------------------------------------------------------------ checks


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


def _checks_payload(check: Check) -> dict:
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


def _total(check: Check) -> int:
    if isinstance(check, AssertTests):
        return len(check.tests)
    return 1 if isinstance(check, HumanEvalTest) else len(check.inputs)


# ------------------------------------------------------------------------------------------------ results


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
    hit: tests after it count as failed) or "crashed" (the program did not load, or the sandbox could not
    run it). ``passed``/``total``: tests (HumanEval: 1). ``failed_tests``: indices of the tests that failed.
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


@dataclass(frozen=True)
class Isolation:
    """What the sandbox can enforce on this machine (see the package docstring)."""

    namespaces: bool  # fresh pid/net/mount namespaces and the jail: no network, no host files, no strays
    private_uid: (
        bool  # fresh unprivileged uids per execution: the candidate cannot touch the checker or parent
    )
    process_limit: bool  # RLIMIT_NPROC actually caps the program's processes
    reason: str = ""  # why a protection is missing

    @property
    def tier(self) -> str:
        return "namespaces" if self.namespaces else "basic"


_ISOLATION_LOCK = threading.Lock()
_ISOLATION: dict[str, Isolation] = {}


def isolation() -> Isolation:
    """Probe once (per ``PIPELINE_SANDBOX_ISOLATION`` value: ``auto``, the default, or ``basic``) which
    isolation works here; a missing protection is logged as a warning once."""
    mode = os.environ.get("PIPELINE_SANDBOX_ISOLATION", "auto").strip().lower() or "auto"
    if mode not in ("auto", "basic"):
        raise ValueError(f"PIPELINE_SANDBOX_ISOLATION must be 'auto' or 'basic', got {mode!r}")
    with _ISOLATION_LOCK:
        if mode not in _ISOLATION:
            _ISOLATION[mode] = _probe(mode)
        return _ISOLATION[mode]


def _basic(reason: str, warn: bool) -> Isolation:
    non_root = hasattr(os, "geteuid") and os.geteuid() != 0
    iso = Isolation(namespaces=False, private_uid=False, process_limit=non_root, reason=reason)
    if warn:
        logger.warning(
            "sandbox: %s; running untrusted code WITHOUT network, filesystem or process-tree isolation "
            "(the verdict is still the checker's, in its own process; rlimits, scrubbed environment and a "
            "temporary directory only%s)",
            reason,
            "" if non_root else "; no process cap either, since RLIMIT_NPROC does not bind root",
        )
    return iso


# The probe's candidate checks its own containment and answers with a string: plain data, judged by the checker.
_PROBE_PROGRAM = """
import os
def probe(net, outside, host_file):
    assert os.getuid() != 0, "still root"
    assert os.getppid() == 1, "not in a PID namespace"
    assert os.readlink("/proc/self/ns/net") != net, "not in a network namespace"
    import decimal, fractions  # the standard library (pure and extension modules) is readable
    with open("probe.txt", "w") as f:
        f.write("ok")
    try:
        open(outside, "w").close()
    except OSError:
        pass
    else:
        raise AssertionError("could write outside the work dir")
    assert not os.path.exists(host_file), "a host file is visible"
    return "contained"
"""


def _probe(mode: str) -> Isolation:
    if mode == "basic":
        return _basic("PIPELINE_SANDBOX_ISOLATION=basic", warn=False)
    if not sys.platform.startswith("linux"):
        return _basic(f"namespaces need Linux (this is {sys.platform})", warn=True)
    if os.geteuid() != 0:
        return _basic("not running as root: no fresh uid or namespaces", warn=True)
    if _unshare() is None:
        return _basic("util-linux `unshare` not found", warn=True)
    outside = os.path.join(tempfile.gettempdir(), f"sandbox-probe-{secrets.token_hex(8)}")
    test = f"assert probe({os.readlink('/proc/self/ns/net')!r}, {outside!r}, {HARNESS!r}) == 'contained'"
    try:
        res = _execute(_PROBE_PROGRAM, AssertTests((test,)), 20.0, Limits(), namespaces=True)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(outside)
    if res.status != "passed":
        lines = res.stderr.strip().splitlines()
        detail = res.error or (lines[-1] if lines else res.status)
        return _basic(f"namespace sandbox unavailable ({detail})", warn=True)
    return Isolation(namespaces=True, private_uid=True, process_limit=True)


@functools.cache
def _unshare() -> str | None:
    return shutil.which("unshare", path=os.environ.get("PATH", "") + ":/usr/bin:/bin")


@functools.cache
def _read_only_paths() -> tuple[str, ...]:
    """What the jail shows read-only: the interpreter's prefixes, stdlib, site-packages and binary, and the
    system libraries. Nested paths ride along with their parent."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        with contextlib.suppress(KeyError):
            paths.add(sysconfig.get_paths()[key])
    found = sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)})
    kept: list[str] = []
    for path in found:
        if not any(path == k or path.startswith(k + "/") for k in kept):
            kept.append(path)
    system = [os.path.realpath(p) for p in _SYSTEM_LIBRARIES if os.path.exists(p)]
    return tuple(kept + sorted({p for p in system if not any(p.startswith(k + "/") for k in kept)}))


@functools.cache
def _jail_links() -> tuple[tuple[str, str], ...]:
    """Symbolic links among the system paths (merged /usr: /lib -> usr/lib), made again inside the jail so
    that the ELF interpreter of a program the candidate starts is where its binary says."""
    return tuple((p, os.readlink(p)) for p in _SYSTEM_LIBRARIES if os.path.islink(p) and os.path.exists(p))


@functools.cache
def _site_paths() -> list[str]:
    """The site-packages folders of this interpreter, which candidate programs may import from."""
    import site

    found = [p for p in [*site.getsitepackages(), *sys.path] if p.endswith("-packages") and os.path.isdir(p)]
    return list(dict.fromkeys(found))


_BYTECODE_LOCK = threading.Lock()
_BYTECODE: list[str] = []


def _harness_bytecode() -> str:
    """harness.py compiled once per process into a private folder: compiling its source at every start
    costs ~25 ms of each execution (and with PYTHONDONTWRITEBYTECODE nothing else caches it)."""
    import atexit
    import py_compile

    with _BYTECODE_LOCK:
        if not _BYTECODE or not os.path.isfile(_BYTECODE[0]):
            folder = tempfile.mkdtemp(prefix="pipeline-harness-")  # 0700: no sandbox uid can reach it
            path = os.path.join(folder, "harness.pyc")
            py_compile.compile(HARNESS, cfile=path, doraise=True)
            atexit.register(shutil.rmtree, folder, True)
            _BYTECODE[:] = [path]
        return _BYTECODE[0]


def _fresh_uid() -> int:
    return 2**30 + secrets.randbelow(2**30 - 2)


def _read_capped(path: str, limit: int) -> str:
    """Head and tail of a possibly huge output file (a traceback's useful part is at the end)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= limit:
            return f.read().decode("utf-8", errors="replace")
        half = limit // 2
        head = f.read(half)
        f.seek(size - half)
        tail = f.read(half)
    return (
        f"{head.decode('utf-8', errors='replace')}\n...[{size - 2 * half} bytes truncated]...\n"
        f"{tail.decode('utf-8', errors='replace')}"
    )


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


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]
    return []


def _wait_dead(pid: int, seconds: float = 2.0) -> None:
    """Until ``pid`` is gone or a zombie: a namespace's processes are dead once its init is."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        time.sleep(0.005)


@contextlib.contextmanager
def _scratch_dir():
    """A temporary folder removed afterwards even when a program left a tree too deep for shutil.rmtree
    (basic tier: its work dir is on the host's disk)."""
    path = tempfile.mkdtemp(prefix="sandbox-")
    try:
        yield path
    finally:
        try:
            shutil.rmtree(path)
        except (RecursionError, OSError):
            subprocess.run(["rm", "-rf", "--one-file-system", path], check=False, capture_output=True)


def _anonymous_file(data: bytes = b"") -> int:
    """A descriptor of a file with no name (unlinked at once): only the processes holding it can reach it."""
    fd, path = tempfile.mkstemp(prefix="sandbox-io-")
    os.unlink(path)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _verdict(raw: bytes, total: int) -> dict | None:
    """The checker's report, validated; None when there is none."""
    try:
        result = json.loads(raw.decode("utf-8", "surrogatepass")) if raw else None
    except ValueError:
        return None
    if not isinstance(result, dict):
        return None
    if "setup_error" in result:
        return {"setup_error": str(result["setup_error"])}
    passed = result.get("passed")
    if not (isinstance(passed, int) and result.get("total") == total and 0 <= passed <= total):
        return None
    return result


class _Sandbox:
    """One execution's sandbox, started before its job is known (so a pool can keep some warm): the
    harness sets up the namespaces, jail and pipes, then waits for the program and the checks."""

    def __init__(self, namespaces: bool, limits: Limits, timeout: float):
        self.namespaces, self.limits, self.timeout = namespaces, limits, timeout
        self._scratch = _scratch_dir()
        outer = self._scratch.__enter__()
        self.out_path, self.err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
        work = {role: os.path.join(outer, f"work-{role}") for role in ("candidate", "checker")}
        for path in work.values():
            os.mkdir(path, 0o700)
        os.mkdir(os.path.join(outer, "jail"), 0o755)
        uids = None
        if namespaces:
            uids = {"candidate": _fresh_uid(), "checker": _fresh_uid()}
            os.chmod(outer, 0o711)  # each sandbox uid may pass through to its work dir, not read our files
            for role, path in work.items():
                os.chown(path, uids[role], uids[role])
        cpu = limits.cpu_seconds if limits.cpu_seconds is not None else math.ceil(timeout) + 1
        self.result_fd = _anonymous_file()
        job_r, self.job_w = os.pipe()
        cfg = {
            "namespaces": namespaces,
            "uids": uids,
            "nproc": "absolute" if namespaces else "relative" if os.geteuid() != 0 else "none",
            "limits": {
                "cpu_seconds": max(1, int(cpu)),
                "memory_bytes": int(limits.memory_bytes),
                "file_size_bytes": int(limits.file_size_bytes),
                "max_processes": int(limits.max_processes),
                "work_dir_bytes": int(limits.work_dir_bytes),
            },  # fmt: skip
            "timeout": float(timeout),
            "watchdog": float(timeout) + _WATCHDOG_GRACE_S,
            "idle_seconds": _IDLE_S,
            "read_only": list(_read_only_paths()) if namespaces else [],
            "links": [list(link) for link in _jail_links()] if namespaces else [],
            "jail": os.path.join(outer, "jail"),
            "work_dirs": work,
            "host_mnt_ns": os.readlink("/proc/self/ns/mnt") if namespaces else "",
            "result_fd": self.result_fd,
            "job_fd": job_r,
            "site_paths": _site_paths(),
        }
        config_path = os.path.join(outer, "config.json")
        with open(
            os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8"
        ) as f:
            json.dump(cfg, f)
        # -S: no site processing at every start (~6 ms); the candidate gets site-packages on its path instead
        cmd = [sys.executable, "-I", "-B", "-S", _harness_bytecode(), config_path]
        if namespaces:
            cmd = [_unshare() or "unshare", *_UNSHARE_FLAGS, *cmd]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "TMPDIR": work["candidate"],
        }
        self.proc, self.start_error = None, ""
        # Output goes to files, not pipes: RLIMIT_FSIZE then bounds it (and our memory), and stray processes
        # holding a pipe open cannot make us hang.
        try:
            with open(self.out_path, "wb") as out_f, open(self.err_path, "wb") as err_f:
                self.proc = subprocess.Popen(cmd, cwd=work["candidate"], env=env, stdin=subprocess.DEVNULL,
                                             stdout=out_f, stderr=err_f, start_new_session=True,
                                             pass_fds=(self.result_fd, job_r))  # fmt: skip
        except OSError as e:
            self.start_error = f"could not start the sandbox: {e}"
        finally:
            os.close(job_r)

    def run(self, program: str, check: Check) -> ExecResult:
        """Hand the sandbox its job, wait for the verdict (or the timeout), tear everything down."""
        total = _total(check)
        start = time.monotonic()
        try:
            if self.proc is None:
                return ExecResult("crashed", 0, total, "", "", self.start_error)
            with contextlib.suppress(OSError):  # a harness that died in set-up reports why below
                send(self.job_w, {"program": program, "whole": isinstance(check, StdioTests)})
                send(self.job_w, _checks_payload(check))
            os.close(self.job_w)
            self.job_w = -1
            finished = self._wait(start + self.timeout + _REPORT_GRACE_S)
            elapsed = time.monotonic() - start
            stdout = _read_capped(self.out_path, self.limits.max_output_chars)
            stderr = _read_capped(self.err_path, self.limits.max_output_chars)
            raw = os.pread(self.result_fd, 1 << 20, 0)
        finally:
            self.discard()
        return _result(_verdict(raw, total), finished, total, stdout, stderr, elapsed, self.timeout)

    def _wait(self, deadline: float) -> bool:
        finished, init_pid = False, None
        try:
            finished = _wait_without_reaping(self.proc, deadline)
        finally:
            if self.namespaces and not finished:  # the namespace's init, to wait for its teardown below
                init_pid = next(iter(_children(self.proc.pid)), None)
            # Kill the whole group (also strays of a program that ended) while the leader is still an
            # unreaped zombie, then reap it.
            _kill_group(self.proc.pid)
            self.proc.wait()
            if init_pid is not None:
                _wait_dead(init_pid)
        return finished

    def discard(self) -> None:
        """End the sandbox (used or not) and remove its files."""
        if self.job_w >= 0:
            os.close(self.job_w)
            self.job_w = -1
        if self.proc is not None and self.proc.returncode is None:
            _kill_group(self.proc.pid)
            self.proc.wait()
        if self.result_fd >= 0:
            os.close(self.result_fd)
            self.result_fd = -1
        if self._scratch is not None:
            self._scratch.__exit__(None, None, None)
            self._scratch = None


def _result(result: dict | None, finished: bool, total: int, stdout: str, stderr: str, elapsed: float,
            timeout: float) -> ExecResult:  # fmt: skip
    """The ExecResult of a checker's report (or of its absence)."""
    if result is None:
        if not finished:
            return ExecResult("timeout", 0, total, stdout, stderr, f"timed out after {timeout:g} s", elapsed)
        return ExecResult("crashed", 0, total, stdout, stderr, "the checker reported no verdict", elapsed)
    if "setup_error" in result:
        logger.warning("sandbox setup failed: %s", result["setup_error"])
        return ExecResult("crashed", 0, total, stdout, stderr, f"sandbox setup failed: {result['setup_error']}",
                          elapsed)  # fmt: skip
    passed, error = result["passed"], str(result.get("error", ""))
    failed = result.get("failed")
    failed_tests = tuple(i for i in failed if isinstance(i, int)) if isinstance(failed, list) else ()
    if result.get("timed_out"):
        status = "timeout"
        error = error or f"timed out after {timeout:g} s"
    elif result.get("load_failed") or result.get("setup_failed"):
        status = "crashed"
    else:
        status = "passed" if passed == total else "failed"
    return ExecResult(status, passed, total, stdout, stderr, error, elapsed, failed_tests)


def _execute(program: str, check: Check, timeout: float, limits: Limits, namespaces: bool) -> ExecResult:
    """One execution in a sandbox started for it."""
    return _Sandbox(namespaces, limits, timeout).run(program, check)


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
            self.ready.append(_Sandbox(*self.args))

    def run(self, program: str, check: Check) -> ExecResult:
        with self.lock:
            sandbox = self.ready.pop(0) if self.ready else None
            if sandbox is None:
                self.left -= 1
            else:
                self._start()
        return (sandbox or _Sandbox(*self.args)).run(program, check)

    def close(self) -> None:
        with self.lock:
            for sandbox in self.ready:
                sandbox.discard()
            self.ready = []


# ------------------------------------------------------------------------------------------------ public API


def run_check(program: str, check, timeout: float = 5.0, limits: Limits | None = None) -> ExecResult:
    """Load ``program`` in a fresh candidate sandbox and judge it by ``check`` in a separate checker."""
    return _execute(program, as_check(check), timeout, limits or Limits(), isolation().namespaces)


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
    """
    from tqdm.auto import tqdm

    jobs = [(program, as_check(check)) for program, check in jobs]
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
