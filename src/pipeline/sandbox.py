"""Sandboxed execution of untrusted Python programs (model-generated code) and their tests.

Two modes share one subprocess/limits implementation:

- :func:`run_tests` execs a program, then runs each ``assert``-style test statement separately and
  reports how many passed (the synthetic task, code-RL rewards);
- :func:`run_program` runs a whole program (HumanEval's ``prompt + completion + test + check(...)``) and
  passes iff the program runs to its end without raising. ``sys.exit(0)`` or ``os._exit(0)`` before the end
  is a failure, not a pass.

:func:`run_many` runs many of either on a bounded thread pool with a progress bar. Each result is an
:class:`ExecResult`: ``passed``, ``failed`` (some test failed), ``timeout`` or ``crashed`` (the program did
not exec, or died without reporting), with truncated stdout/stderr.

How one execution is contained ("namespaces" tier: Linux, run as root, util-linux ``unshare``; this is
what the project's machines give, and :func:`isolation` reports what the current machine gives):

- **process tree**: ``unshare --pid --fork`` starts the harness as PID 1 of a fresh PID namespace. When it
  exits, the kernel kills every process left in the namespace, including ones that left the process group
  with ``setsid``. The parent kills the whole process group at the wall-clock timeout. PID 1 also stops on
  its own ``timeout + 2`` s after it starts, so nothing outlives a parent that died. PID 1 stays root and only
  supervises; the program runs in its forked child.
- **identity**: the program runs under a fresh random uid/gid (2**30 to 2**31, different for each execution),
  with no supplementary groups and ``no_new_privs`` set. RLIMIT_NPROC is not enforced for root: the kernel
  exempts uid 0 whatever its capabilities (checked here: uid 0 with every capability dropped still forks
  past the limit). So a fork bomb can only be capped under another uid. One uid shared by all sandboxes (e.g. ``nobody``) would let one
  sandbox's fork bomb use up the others' process budget, and would let sandboxes signal each other. A
  fresh uid makes RLIMIT_NPROC a per-execution cap, and the program cannot signal the parent or any
  other sandbox.
- **network**: ``unshare --net``: a fresh network namespace whose only interface, loopback, is down. No
  connection can be made, not even to 127.0.0.1.
- **filesystem**: in a private mount namespace, every mount is remounted read-only and nosuid except the
  fresh work directory (a read-write bind mount; ``TMPDIR`` points there). A private directory on the
  interpreter's path (e.g. ``/root``, mode 0700, where pyenv installs Python) is covered with a tiny
  tmpfs that holds only the interpreter's directories, so the rest of it (credentials) is invisible.
  ``/proc`` is the namespace's own, so other processes' command lines and environments cannot be read.
- **resources** (``resource``): CPU seconds, address space, file size (this also caps stdout/stderr, which go
  to files), no core files, and at most ``max_processes`` tasks (threads count). ``oom_score_adj`` is 1000,
  so under memory pressure the OOM killer picks sandboxed processes first, not the pipeline.
- **environment**: only ``PATH``, ``LANG`` and ``TMPDIR``: no API keys, ``WANDB_*`` or proxy variables.
  stdin is ``/dev/null``. The interpreter runs with ``-I -B``.

Fallback ("basic" tier: not root, not Linux, no working ``unshare``, or ``PIPELINE_SANDBOX_ISOLATION=basic``):
a subprocess in its own session with the same rlimits, environment and temporary directory. For a non-root
user, RLIMIT_NPROC counts all of that user's processes, so it is set to the user's current task count plus
``max_processes``; as root nothing caps processes. The basic tier does NOT contain network access, file
writes outside the work dir, processes that leave the process group, or signals to the parent. A warning is
logged once. (A non-root namespace tier through user namespaces would be possible where they are enabled,
but it is not implemented.)

Limits of this design:

- The tests run inside the program's own process. A program written to subvert the harness can fake a pass,
  for example with an object whose ``__eq__`` is always True, or by reading the harness's frames to forge
  its result line. The nonce-tagged result line, which only the original process may write, stops
  accidental and naive forgeries.
- Memory is capped per process (RLIMIT_AS). A sandbox's total is capped only by
  ``max_processes * memory_bytes``. No cgroup is used: on these machines the memory cgroup belongs to the
  job runner.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
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

__all__ = [
    "ExecResult",
    "Isolation",
    "Limits",
    "isolation",
    "run_many",
    "run_program",
    "run_tests",
    "strip_code_fence",
]

logger = logging.getLogger(__name__)

MAX_OUTPUT_CHARS = 4096
_RESULT_READ_BYTES = 64 * 1024
_WATCHDOG_GRACE_S = 2.0
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

# The harness is the trusted part. It reads its payload (program, tests, limits, nonce) and deletes it
# before the program runs. In the namespaces tier it starts as root and PID 1: it prepares the mounts, forks
# the worker, and only supervises. The worker sets the limits, drops to the fresh uid, and runs the program.
# Everything it needs after the program ran is bound beforehand, so monkeypatching os/json/sys does not
# change the result line (a program determined to cheat still can: see the module docstring).
_HARNESS = r"""
import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
KEEP_FLAGS = {"nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
              "relatime": 1 << 21, "strictatime": 1 << 24}


class Libc:
    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def call(self, name, *args):
        if getattr(self.lib, name)(*args) != 0:
            err = self.ctypes.get_errno()
            raise OSError(err, "%s%r: %s" % (name, args, os.strerror(err)))

    def mount(self, source, target, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        self.call("mount", enc(source), enc(target), enc(fstype), self.ctypes.c_ulong(flags), enc(data))


def mounts():
    import re

    unescape = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            yield unescape(fields[4]), fields[fields.index("-") + 1], set(fields[5].split(","))


def prepare_filesystem(cfg, libc):
    # Never touch mounts unless this really is a private mount namespace (the host's would change).
    if os.readlink("/proc/self/ns/mnt") == cfg["host_mnt_ns"]:
        raise RuntimeError("not in a private mount namespace")
    hidden = []
    for top, paths in cfg["overlays"]:
        fds = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) for p in paths]
        libc.mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
        hidden.append(top.rstrip("/") + "/")
        for p, fd in fds:
            os.makedirs(p, 0o755, exist_ok=True)
            libc.mount("/proc/self/fd/%d" % fd, p, None, MS_BIND | MS_REC)
            os.close(fd)
    work = cfg["work_dir"]
    libc.mount(work, work, None, MS_BIND)
    libc.mount(None, work, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    os.chdir(work)  # the old cwd lies on a mount about to become read-only
    for target, fstype, opts in list(mounts()):
        if target == work or fstype == "proc" or "ro" in opts:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for name, bit in KEEP_FLAGS.items():
            if name in opts:
                flags |= bit
        try:
            libc.mount(None, target, None, flags)
        except OSError:
            # A mount under an overlay tmpfs is unreachable anyway; any other failure is fatal.
            if not any(target.startswith(h) for h in hidden):
                raise


def supervise(pid, watchdog):
    import signal

    signal.signal(signal.SIGALRM, lambda *_: os._exit(128 + signal.SIGALRM))
    signal.setitimer(signal.ITIMER_REAL, watchdog)
    while True:
        wpid, status = os.waitpid(-1, 0)  # also reaps orphans re-parented to us
        if wpid == pid:
            break
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 - code if code < 0 else code)  # leaving kills whatever is left in the namespace


def user_tasks(uid):
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/status" % pid) as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            if int(status["Uid"].split()[0]) == uid:
                n += int(status.get("Threads", "1"))
        except (OSError, ValueError, KeyError):
            pass
    return n


def set_limits(cfg):
    import resource

    def lower(which, soft, hard):
        cur_hard = resource.getrlimit(which)[1]
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(which, (soft, hard))

    lim = cfg["limits"]
    lower(resource.RLIMIT_CPU, lim["cpu_seconds"], lim["cpu_seconds"] + 1)  # SIGXCPU, then SIGKILL
    lower(resource.RLIMIT_AS, lim["memory_bytes"], lim["memory_bytes"])
    lower(resource.RLIMIT_FSIZE, lim["file_size_bytes"], lim["file_size_bytes"])
    lower(resource.RLIMIT_CORE, 0, 0)
    nproc = lim["max_processes"]
    if cfg["nproc"] == "relative":  # a non-root user's count includes all its other processes
        nproc += user_tasks(os.getuid())
    if cfg["nproc"] != "none":
        lower(resource.RLIMIT_NPROC, nproc, nproc)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def drop_privileges(uid, gid, libc):
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    try:
        os.setuid(0)
    except OSError:
        pass
    else:
        raise RuntimeError("could regain root after dropping privileges")
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise RuntimeError("privileges not dropped")
    c_ulong = libc.ctypes.c_ulong
    libc.call("prctl", c_ulong(38), c_ulong(1), c_ulong(0), c_ulong(0), c_ulong(0))  # PR_SET_NO_NEW_PRIVS
    # setuid() made us non-dumpable, so /proc/self/* belongs to root; own it again like any process does
    # (nothing secret is in this process's memory: it was exec'd with a scrubbed environment).
    libc.call("prctl", c_ulong(4), c_ulong(1), c_ulong(0), c_ulong(0), c_ulong(0))  # PR_SET_DUMPABLE


def setup_failed(cfg, exc):
    import json

    line = "\n%s %s\n" % (cfg["prefix"], json.dumps({"setup_error": "%s: %s" % (type(exc).__name__, exc)}))
    os.write(cfg["result_fd"], line.encode("utf-8"))
    os._exit(125)


def describe(exc):
    try:
        text = str(exc)
        text = "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__
    except BaseException:
        text = "exception"
    return text[:300]


def run(cfg):
    import json
    import traceback

    prefix, program, tests, result_fd = cfg["prefix"], cfg["program"], cfg["tests"], cfg["result_fd"]
    del cfg
    write, exit_, getpid, dumps = os.write, os._exit, os.getpid, json.dumps
    me = getpid()
    ns = {"__name__": "__solution__"}  # not "__main__": a main block must not run (stdin is /dev/null)
    exec_ok, error, failed = True, "", []
    try:
        exec(compile(program, "<program>", "exec"), ns)
    except BaseException as e:
        exec_ok, error = False, describe(e)
        try:  # without the harness's own frame
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        except BaseException:
            pass
    if tests is None:  # whole-program mode: passed iff it ran to its end
        total, passed = 1, int(exec_ok)
    else:
        total, passed = len(tests), 0
        for i in range(total if exec_ok else 0):
            try:
                exec(compile(tests[i], "<test %d>" % i, "exec"), ns)
            except BaseException as e:
                failed.append(i)
                if not error:
                    error = "test %d: %s" % (i, describe(e))
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
    if getpid() != me:  # a forked copy of the worker must not report
        exit_(0)
    body = dumps({"passed": passed, "total": total, "exec_ok": exec_ok, "error": error, "failed": failed})
    write(result_fd, ("\n%s %s\n" % (prefix, body)).encode("utf-8"))
    exit_(0)  # skip atexit handlers and thread joins the program may have registered


def main():
    import json

    path = sys.argv[1]
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    os.remove(path)
    libc = None
    if cfg["namespaces"]:
        try:
            libc = Libc()
            prepare_filesystem(cfg, libc)
        except BaseException as e:
            setup_failed(cfg, e)
        pid = os.fork()
        if pid:
            supervise(pid, cfg["watchdog"])
    try:
        set_limits(cfg)
        if cfg["uid"] is not None:
            drop_privileges(cfg["uid"], cfg["gid"], libc)
    except BaseException as e:
        setup_failed(cfg, e)
    run(cfg)


main()
"""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one execution (the wall-clock timeout is an argument of the run functions).

    ``cpu_seconds`` None means ``ceil(timeout) + 1``. ``max_processes`` counts the sandbox's processes and
    threads (RLIMIT_NPROC); it holds in the namespaces tier and, for non-root users, in the basic tier.
    """

    memory_bytes: int = 1024**3
    file_size_bytes: int = 16 * 1024**2
    max_processes: int = 16
    cpu_seconds: int | None = None
    max_output_chars: int = MAX_OUTPUT_CHARS


@dataclass
class ExecResult:
    """Outcome of one execution.

    ``status``: "passed" (every test passed / the whole program ran to its end), "failed" (some test
    failed / the program raised), "timeout" (wall-clock limit hit) or "crashed" (in test mode: the program
    did not exec; in both modes: the process died or exited without reporting). ``failed_tests``: indices of
    the tests that ran and failed (test mode). ``error`` is a one-line reason (the first failure) and
    ``elapsed`` the wall-clock seconds. These three do not take part in ``==``.
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
    """What the sandbox can enforce on this machine (see the module docstring)."""

    namespaces: bool  # fresh pid/net/mount namespaces: no network, read-only fs, no stray processes
    private_uid: bool  # a fresh unprivileged uid per execution: cannot signal the parent or other sandboxes
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
            "(rlimits, scrubbed environment and a temporary directory only%s)",
            reason,
            "" if non_root else "; no process cap either, since RLIMIT_NPROC does not bind root",
        )
    return iso


_PROBE_PROGRAM = """
import os
assert os.getuid() != 0, "still root"
assert os.getppid() == 1, "not in a PID namespace"
assert os.readlink("/proc/self/ns/net") != {net!r}, "not in a network namespace"
import decimal, fractions  # the standard library (pure and extension modules) is readable
with open("probe.txt", "w") as f:
    f.write("ok")
try:
    open({outside!r}, "w").close()
except OSError:
    pass
else:
    raise AssertionError("could write outside the work dir")
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
    program = _PROBE_PROGRAM.format(net=os.readlink("/proc/self/ns/net"), outside=outside)
    try:
        res = _execute(program, None, 20.0, Limits(), namespaces=True)
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


def _interpreter_paths() -> set[str]:
    """Directories the sandboxed interpreter reads: its prefixes, stdlib, site-packages, binary."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        with contextlib.suppress(KeyError):
            paths.add(sysconfig.get_paths()[key])
    paths.add(tempfile.gettempdir())  # the work dirs live there
    return {os.path.realpath(p) for p in paths if p and os.path.isdir(p)}


_OVERLAYS: list[tuple[str, list[str]]] | None = None


def _overlays() -> list[tuple[str, list[str]]]:
    """For each topmost directory on those paths that others may not search (e.g. /root, 0700): the paths
    under it to bind back into the tmpfs that will cover it."""
    global _OVERLAYS
    if _OVERLAYS is None:
        groups: dict[str, list[str]] = {}
        for path in sorted(_interpreter_paths()):
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                ancestor = "/" + "/".join(parts[:i])
                if not os.stat(ancestor).st_mode & 0o001:
                    kept = groups.setdefault(ancestor, [])
                    # nested paths ride along with their shortest prefix (sorted order puts it first)
                    if not any(path == k or path.startswith(k + "/") for k in kept):
                        kept.append(path)
                    break
        _OVERLAYS = sorted(groups.items())
    return _OVERLAYS


def _fresh_uid() -> int:
    return 2**30 + secrets.randbelow(2**30 - 2)


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(text)


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


def _truncate(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
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


def _parse_result(path: str, prefix: str, total: int) -> dict | None:
    """The last line carrying the nonce in the result file, validated; None if there is none."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - _RESULT_READ_BYTES))
        text = f.read().decode("utf-8", errors="replace")
    result = None
    for line in text.split("\n"):
        if line.startswith(prefix + " "):
            try:
                result = json.loads(line[len(prefix) + 1 :])
            except ValueError:
                result = None
    if not isinstance(result, dict):
        return None
    if "setup_error" in result:
        return {"setup_error": str(result["setup_error"])}
    passed = result.get("passed")
    ok = (
        isinstance(passed, int)
        and result.get("total") == total
        and 0 <= passed <= total
        and isinstance(result.get("exec_ok"), bool)
    )
    return result if ok else None


_SIGNAL_HINTS = {
    "SIGXCPU": "CPU time limit",
    "SIGXFSZ": "file size limit",
    "SIGSEGV": "segmentation fault: stack or memory limit?",
    "SIGKILL": "CPU time hard limit, or a kill signal",
}


def _exit_reason(returncode: int, namespaces: bool) -> str:
    """Why a process that did not report ended; the namespace's init exits 128+N for a signal N."""
    sig = -returncode if returncode < 0 else returncode - 128 if namespaces and returncode > 128 else 0
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        hint = _SIGNAL_HINTS.get(name)
        return f"killed by {name}" + (f" ({hint})" if hint else "")
    return f"exited with status {returncode} before reporting a result"


def _execute(
    program: str, tests: Sequence[str] | None, timeout: float, limits: Limits, namespaces: bool
) -> ExecResult:
    """The one implementation behind every mode: spawn the harness, enforce the timeout, read results."""
    tests = None if tests is None else [str(t) for t in tests]
    total = 1 if tests is None else len(tests)
    prefix = f"__RESULT_{secrets.token_hex(16)}__"
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sandbox-") as outer:
        work = os.path.join(outer, "work")
        os.mkdir(work, 0o700)
        uid = None
        if namespaces:
            uid = _fresh_uid()
            os.chmod(outer, 0o711)  # the sandbox uid may pass through to work/, not read our files
            os.chown(work, uid, uid)
        harness, payload = os.path.join(outer, "harness.py"), os.path.join(outer, "payload.json")
        out_path, err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
        result_path = os.path.join(outer, "result")
        cpu = limits.cpu_seconds if limits.cpu_seconds is not None else math.ceil(timeout) + 1
        # The result goes through an inherited descriptor: inside the namespace every mount but work/ is
        # read-only, and a descriptor opened outside it stays writable.
        result_fd = os.open(result_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        cfg = {
            "prefix": prefix,
            "program": program,
            "tests": tests,
            "result_fd": result_fd,
            "namespaces": namespaces,
            "uid": uid,
            "gid": uid,
            "nproc": "absolute" if namespaces else "relative" if os.geteuid() != 0 else "none",
            "limits": {
                "cpu_seconds": max(1, int(cpu)),
                "memory_bytes": int(limits.memory_bytes),
                "file_size_bytes": int(limits.file_size_bytes),
                "max_processes": int(limits.max_processes),
            },
            "watchdog": float(timeout) + _WATCHDOG_GRACE_S,
            "overlays": _overlays() if namespaces else [],
            "work_dir": work,
            "host_mnt_ns": os.readlink("/proc/self/ns/mnt") if namespaces else "",
        }
        try:
            _write_private(harness, _HARNESS)
            _write_private(payload, json.dumps(cfg))
            cmd = [sys.executable, "-I", "-B", harness, payload]
            if namespaces:
                cmd = [_unshare() or "unshare", *_UNSHARE_FLAGS, *cmd]
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "TMPDIR": work}
            # Output goes to files, not pipes: RLIMIT_FSIZE then bounds it (and our memory), and stray
            # processes holding a pipe open cannot make us hang.
            with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
                try:
                    proc = subprocess.Popen(
                        cmd,
                        cwd=work,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out_f,
                        stderr=err_f,
                        start_new_session=True,
                        pass_fds=(result_fd,),
                    )
                except OSError as e:
                    return ExecResult("crashed", 0, total, "", "", f"could not start the sandbox: {e}")
        finally:
            os.close(result_fd)
        finished, init_pid = False, None
        try:
            finished = _wait_without_reaping(proc, start + timeout)
        finally:
            if namespaces and not finished:  # the namespace's init, to wait for its teardown below
                init_pid = next(iter(_children(proc.pid)), None)
            # Kill the whole group (also children of a program that exited normally) while the leader is
            # still an unreaped zombie, then reap it.
            _kill_group(proc.pid)
            proc.wait()
            if init_pid is not None:
                _wait_dead(init_pid)
        elapsed = time.monotonic() - start
        stdout = _read_capped(out_path, limits.max_output_chars)
        stderr = _read_capped(err_path, limits.max_output_chars)
        result = _parse_result(result_path, prefix, total)
    if not finished:
        return ExecResult("timeout", 0, total, stdout, stderr, f"timed out after {timeout:g} s", elapsed)
    if result is None:
        reason = _exit_reason(proc.returncode, namespaces)
        return ExecResult("crashed", 0, total, stdout, stderr, reason, elapsed)
    if "setup_error" in result:
        logger.warning("sandbox setup failed: %s", result["setup_error"])
        error = f"sandbox setup failed: {result['setup_error']}"
        return ExecResult("crashed", 0, total, stdout, stderr, error, elapsed)
    passed, error = result["passed"], str(result.get("error", ""))
    if tests is not None and not result["exec_ok"]:
        return ExecResult("crashed", 0, total, stdout, stderr, error, elapsed)
    failed = result.get("failed")
    failed_tests = tuple(i for i in failed if isinstance(i, int)) if isinstance(failed, list) else ()
    status = "passed" if passed == total and result["exec_ok"] else "failed"
    return ExecResult(status, passed, total, stdout, stderr, error, elapsed, failed_tests)


def _run_one(program: str, tests: Sequence[str] | None, timeout: float, limits: Limits | None) -> ExecResult:
    return _execute(program, tests, timeout, limits or Limits(), isolation().namespaces)


def run_tests(
    program: str, tests: Sequence[str], timeout: float = 5.0, limits: Limits | None = None
) -> ExecResult:
    """Exec ``program`` in a fresh sandbox, then run each test statement separately.

    Tests share the program's namespace; a test passes when it raises nothing. A timeout reports
    ``passed=0`` even if some tests had passed, since the harness never got to report.
    """
    return _run_one(program, list(tests), timeout, limits)


def run_program(program: str, timeout: float = 5.0, limits: Limits | None = None) -> ExecResult:
    """Run a whole program (e.g. HumanEval's prompt + completion + test + ``check(...)``) in a fresh sandbox:
    ``passed`` (1/1) iff it runs to its end without raising, else ``failed``/``timeout``/``crashed``."""
    return _run_one(program, None, timeout, limits)


def run_many(
    jobs: Iterable[tuple[str, Sequence[str] | None]],
    timeout: float = 5.0,
    workers: int | None = None,
    progress: str | None = None,
    limits: Limits | None = None,
) -> list[ExecResult]:
    """Run ``(program, tests)`` jobs on ``workers`` threads (default: CPU count); results in input order.

    ``tests`` None runs ``program`` whole (:func:`run_program`), a list runs :func:`run_tests`.
    ``progress``: a label to show a progress bar with (None: no bar). Every execution ends within its
    timeout plus teardown, whatever the program does, so one hostile job cannot stall the pool.
    """
    from tqdm.auto import tqdm

    jobs = list(jobs)
    if not jobs:
        return []
    isolation()  # probe once here rather than in racing worker threads
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    results: list[ExecResult | None] = [None] * len(jobs)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
    try:
        futures = {
            pool.submit(_run_one, program, tests, timeout, limits): i
            for i, (program, tests) in enumerate(jobs)
        }
        with tqdm(total=len(jobs), desc=progress, disable=progress is None, unit="run") as bar:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    finally:
        # On an error or Ctrl-C, queued jobs must not start; running ones end within their timeout.
        pool.shutdown(wait=True, cancel_futures=True)
    return results  # type: ignore[return-value]


_OPEN_FENCE = re.compile(r"^(`{3,})[^`]*$")


def strip_code_fence(text: str) -> str:
    """Remove exactly one Markdown code fence enclosing the whole (trimmed) text; else return ``text``.

    Only whole lines are removed (never a character-set strip, which would eat the "r" of ``return``).
    Text with several fenced blocks, or prose around a block, is returned unchanged.
    """
    start, stop = code_fence_span(text)
    return text[start:stop]


def code_fence_span(text: str) -> tuple[int, int]:
    """`(start, stop)` of what `strip_code_fence` keeps: the inside of the fence, or all of ``text``.

    Works with indices into ``text`` rather than copies of it or a list of its lines: `prepare` runs it over
    millions of responses (tests/test_fence.py checks it against the line-by-line statement of the rule).
    """
    whole = (0, len(text))
    # [lo, hi) is text.strip(), found without copying the text where its ends need no trimming
    if text[:1] == "`":
        lo = 0
    elif text[:1].isspace():
        lo = len(text) - len(text.lstrip())
        if text[lo : lo + 1] != "`":
            return whole
    else:
        return whole
    hi = len(text) if text[-1:] == "`" else len(text.rstrip())
    first_nl = text.find("\n", lo, hi)
    if first_nl < 0:
        return whole
    last_nl = text.rfind("\n", lo, hi)
    opening = _OPEN_FENCE.match(text[lo:first_nl].rstrip())
    if opening is None:
        return whole
    ticks = opening.group(1)
    closing = text[last_nl + 1 : hi].strip()
    if not (closing.startswith(ticks) and set(closing) == {"`"}):
        return whole
    if last_nl == first_nl:  # an opening and a closing line with nothing between
        return (0, 0)
    # A fence line inside means the text is more than one block (e.g. ```a``` prose ```b```).
    if _has_fence_line(text, ticks, first_nl + 1, last_nl):
        return whole
    return (first_nl + 1, last_nl)


def _has_fence_line(text: str, ticks: str, start: int, stop: int) -> bool:
    """Whether a line of ``text[start:stop]`` (which starts a line) begins with `ticks` after blanks."""
    pos = text.find("`", start, stop)  # one character: a memchr scan, several times faster than "```"
    while pos >= 0:
        if text.startswith(ticks, pos, stop):
            line_start = max(start, text.rfind("\n", start, pos) + 1)
            if line_start == pos or text[line_start:pos].isspace():
                return True
        pos = text.find("`", pos + 1, stop)
    return False
