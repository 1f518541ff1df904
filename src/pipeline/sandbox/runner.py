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
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.sandbox.checks import (
    AssertTests,
    Check,
    ExecResult,
    Limits,
    StdioTests,
    checks_payload,
    total_checks,
)
from pipeline.sandbox.harness import send
from pipeline.sandbox.process import (
    anonymous_file,
    children_of,
    fresh_uid,
    kill_group,
    read_capped,
    scratch_dir,
    wait_dead,
    wait_without_reaping,
)

logger = logging.getLogger("pipeline.sandbox")

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


# ------------------------------------------------------------------------------------------------ results


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
        # one attempt, no retries: a namespace sandbox that cannot start is exactly what the probe asks about
        res = Sandbox(True, Limits(), 20.0).run(_PROBE_PROGRAM, AssertTests((test,)))
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


class Sandbox:
    """One execution's sandbox, started before its job is known (so a pool can keep some warm): the
    harness sets up the namespaces, jail and pipes, then waits for the program and the checks."""

    def __init__(self, namespaces: bool, limits: Limits, timeout: float):
        self.namespaces, self.limits, self.timeout = namespaces, limits, timeout
        self._scratch = scratch_dir()
        outer = self._scratch.__enter__()
        self.out_path, self.err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
        work = {role: os.path.join(outer, f"work-{role}") for role in ("candidate", "checker")}
        for path in work.values():
            os.mkdir(path, 0o700)
        os.mkdir(os.path.join(outer, "jail"), 0o755)
        uids = None
        if namespaces:
            uids = {"candidate": fresh_uid(), "checker": fresh_uid()}
            os.chmod(outer, 0o711)  # each sandbox uid may pass through to its work dir, not read our files
            for role, path in work.items():
                os.chown(path, uids[role], uids[role])
        cpu = limits.cpu_seconds if limits.cpu_seconds is not None else math.ceil(timeout) + 1
        self.result_fd = anonymous_file()
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
        total = total_checks(check)
        start = time.monotonic()
        try:
            if self.proc is None:
                return ExecResult("error", 0, total, "", "", self.start_error)
            with contextlib.suppress(OSError):  # a harness that died in set-up reports why below
                send(self.job_w, {"program": program, "whole": isinstance(check, StdioTests)})
                send(self.job_w, checks_payload(check))
            os.close(self.job_w)
            self.job_w = -1
            finished = self._wait(start + self.timeout + _REPORT_GRACE_S)
            elapsed = time.monotonic() - start
            stdout = read_capped(self.out_path, self.limits.max_output_chars)
            stderr = read_capped(self.err_path, self.limits.max_output_chars)
            raw = os.pread(self.result_fd, 1 << 20, 0)
        finally:
            self.discard()
        return _result(_verdict(raw, total), finished, total, stdout, stderr, elapsed, self.timeout)

    def _wait(self, deadline: float) -> bool:
        finished, init_pid = False, None
        try:
            finished = wait_without_reaping(self.proc, deadline)
        finally:
            if self.namespaces and not finished:  # the namespace's init, to wait for its teardown below
                init_pid = next(iter(children_of(self.proc.pid)), None)
            # Kill the whole group (also strays of a program that ended) while the leader is still an
            # unreaped zombie, then reap it.
            kill_group(self.proc.pid)
            self.proc.wait()
            if init_pid is not None:
                wait_dead(init_pid)
        return finished

    def discard(self) -> None:
        """End the sandbox (used or not) and remove its files."""
        if self.job_w >= 0:
            os.close(self.job_w)
            self.job_w = -1
        if self.proc is not None and self.proc.returncode is None:
            kill_group(self.proc.pid)
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
        return ExecResult("error", 0, total, stdout, stderr, f"sandbox setup failed: {result['setup_error']}",
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


# ------------------------------------------------------------------------------------------------ public API
