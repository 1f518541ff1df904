"""Operating-system helpers of the trusted parent: process groups, waits that do not reap, capped reads, scratch files."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time


def fresh_uid() -> int:
    return 2**30 + secrets.randbelow(2**30 - 2)


def read_capped(path: str, limit: int) -> str:
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


def wait_without_reaping(proc: subprocess.Popen, deadline: float) -> bool:
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


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # group already gone
        os.killpg(pgid, signal.SIGKILL)


def children_of(pid: int) -> list[int]:
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]
    return []


def wait_dead(pid: int, seconds: float = 2.0) -> None:
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
def scratch_dir():
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


def anonymous_file(data: bytes = b"") -> int:
    """A descriptor of a file with no name (unlinked at once): only the processes holding it can reach it."""
    fd, path = tempfile.mkstemp(prefix="sandbox-io-")
    os.unlink(path)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
