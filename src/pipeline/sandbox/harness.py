"""The inside of one sandboxed execution: `python -I -B harness.py CONFIG` (started by `runner.py`).

Three roles, one process each. The verdict is decided only by the checker, from plain data:

- **supervisor** (namespaces tier: PID 1 of a fresh PID namespace, root). Reads and deletes its config (the
  program, limits, uids), builds the jail, forks the candidate, and only then reads the checks from an
  inherited descriptor, so the candidate's memory never held them. Forks the checker, waits for it, and
  exits: the kernel then kills everything left in the namespace.
- **candidate** (a fresh uid, chrooted in the jail, rlimits, no network). Loads the untrusted program and
  answers requests over a pipe: a call of one of its functions, or a run of the whole program on a stdin.
  Answers are plain data (`encode`), so whatever the program's objects do, none of them reaches the checker.
- **checker** (another fresh uid, chrooted, rlimits, not dumpable). Runs the problem's own, trusted test
  code with the candidate's functions bound to `Proxy` objects, and alone holds the descriptor the result
  goes out on. Nothing the candidate prints, writes, or how it exits changes the verdict; a call the
  candidate cannot answer with plain data (another type, a crash, a timeout, a dead process) is a failure
  the test code cannot catch (`CallFailed` is not an `Exception`).

Standard library only, and importable without side effects: the tests exercise `encode`/`decode` directly.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import select
import struct
import sys
import time

# bound once: a program that patches os.write or json.dumps in the candidate breaks only its own answers
_write, _read, _select, _dumps, _loads = os.write, os.read, select.select, json.dumps, json.loads
MAX_MESSAGE = 32 * 1024 * 1024  # bytes of one answer; a larger one is a failed call
_HEADER = struct.Struct("!Q")
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
STOPPING_EXCEPTIONS = ("SystemExit", "KeyboardInterrupt", "GeneratorExit")


# ------------------------------------------------------------------------------------------------ plain data


class NotPlain(TypeError):
    """A value that is not plain data (see `encode`)."""


def _tagged(value, depth):
    if depth > 200:
        raise NotPlain("nested more than 200 levels")
    kind = type(value)  # exact types: a subclass could carry an __eq__ of its own
    if value is None or kind in (bool, str, float):
        return value
    if kind is int:
        return value if -(10**4000) < value < 10**4000 else {"$ih": format(value, "x")}
    if kind is list:
        return [_tagged(v, depth + 1) for v in value]
    if kind is tuple:
        return {"$t": [_tagged(v, depth + 1) for v in value]}
    if kind is dict:
        return {"$d": [[_tagged(k, depth + 1), _tagged(v, depth + 1)] for k, v in value.items()]}
    if kind is set or kind is frozenset:
        return {"$s" if kind is set else "$f": [_tagged(v, depth + 1) for v in value]}
    if kind is bytes:
        return {"$b": value.hex()}
    if kind is complex:
        return {"$c": [value.real, value.imag]}
    raise NotPlain(f"a {kind.__name__}")


def encode(value) -> bytes:
    """Plain data (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset, nested)
    as JSON text; anything else raises `NotPlain`."""
    return _dumps(_tagged(value, 0), ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"
    )


_BUILD = {
    "$t": tuple,
    "$s": set,
    "$f": frozenset,
    "$d": lambda pairs: {k: v for k, v in pairs},
    "$b": lambda text: bytes.fromhex(text),
    "$c": lambda parts: complex(float(parts[0]), float(parts[1])),
    "$ih": lambda text: int(text, 16),
}


def _untag(pairs):
    if len(pairs) != 1 or pairs[0][0] not in _BUILD:
        raise ValueError("not a plain-data message")
    tag, body = pairs[0]
    if tag in ("$b", "$ih") and type(body) is not str:
        raise ValueError(f"bad {tag} body")
    if tag not in ("$b", "$ih") and type(body) is not list:
        raise ValueError(f"bad {tag} body")
    if tag == "$d" and not all(type(p) is list and len(p) == 2 for p in body):
        raise ValueError("bad $d body")
    return _BUILD[tag](body)


def decode(data: bytes):
    """The inverse of `encode`. It builds nothing but those types (JSON's own parser, then tagged
    containers); a malformed message raises ValueError, TypeError or RecursionError."""
    return _loads(data.decode("utf-8", "surrogatepass"), object_pairs_hook=_untag)


# ------------------------------------------------------------------------------------------------ framing


class Timeout(Exception):
    pass


class Closed(Exception):
    pass


def send(fd, message: dict) -> None:
    body = _dumps(message, separators=(",", ":")).encode("utf-8", "surrogatepass")
    data = _HEADER.pack(len(body)) + body
    while data:
        data = data[_write(fd, data) :]


def _read_exact(fd, n, deadline):
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not _select([fd], [], [], left)[0]:
                raise Timeout()
        chunk = _read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise Closed()
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def receive(fd, deadline=None, limit=MAX_MESSAGE) -> dict:
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    if size > limit:
        raise ValueError(f"a message of {size} bytes (the limit is {limit})")
    message = _loads(_read_exact(fd, size, deadline).decode("utf-8", "surrogatepass"))
    if type(message) is not dict:
        raise ValueError("not a message")
    return message


def describe(exc) -> str:
    try:
        text = str(exc)
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    except BaseException:
        text = "exception"
    return text[:300]


# ------------------------------------------------------------------------------------------------ candidate


def serve(program: str, req_fd: int, resp_fd: int, whole: bool) -> None:
    """The candidate's loop: load the program, then answer requests until the pipe closes. Runs the
    untrusted program; nothing here is trusted by the checker beyond the bytes it sends."""
    ns = {"__name__": "__solution__", "__builtins__": builtins}
    try:
        code = compile(program, "<program>", "exec")
        if not whole:
            exec(code, ns)
        ready = {"ok": True}
    except BaseException as e:
        ready = {"ok": False, "error": describe(e)}
        _print_traceback(e, skip=1)
    _flush()  # what the program printed is kept even though the process is killed, not ended, afterwards
    send(resp_fd, ready)
    if not ready["ok"]:
        return
    while True:
        try:
            request = receive(req_fd)
        except (Closed, OSError, ValueError):
            return
        if request.get("op") == "main":
            answer = _run_main(code, request.get("stdin", ""))
        else:
            answer = _call(ns, request)
        answer["id"] = request.get("id")
        _flush()
        send(resp_fd, answer)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()


def _print_traceback(e, skip=0) -> None:
    """The traceback from the program's own frames on (the harness's first `skip` frames left out)."""
    import traceback

    try:
        tb = e.__traceback__
        for _ in range(skip):
            tb = tb.tb_next if tb is not None else None
        traceback.print_exception(type(e), e, tb)
    except BaseException:
        pass


def _call(ns, request) -> dict:
    try:
        args = decode(request["args"].encode("utf-8", "surrogatepass"))
        kwargs = decode(request["kwargs"].encode("utf-8", "surrogatepass"))
        function = ns[request["name"]]
    except KeyError:
        return {
            "raised": ["NameError", "name {!r} is not defined by the program".format(request.get("name"))]
        }
    except BaseException as e:
        return {"ok": False, "error": "bad request: " + describe(e)}
    try:
        value = function(*args, **kwargs)
    except BaseException as e:
        _print_traceback(e, skip=1)
        return {"raised": [type(e).__name__, describe(e)]}
    try:
        return {"ok": True, "value": encode(value).decode("utf-8", "surrogatepass"),
                "args": encode(args).decode("utf-8", "surrogatepass"),
                "kwargs": encode(kwargs).decode("utf-8", "surrogatepass")}  # fmt: skip
    except NotPlain as e:
        return {"ok": False, "error": f"returned {e}, not plain data"}
    except BaseException as e:
        return {"ok": False, "error": "could not send the result: " + describe(e)}


def _run_main(code, stdin: str) -> dict:
    """Run the whole program as __main__ in a forked child with real stdin/stdout descriptors."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    in_path, out_path = f"stdin-{os.getpid()}", f"stdout-{os.getpid()}"
    try:
        with open(in_path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(stdin)
        open(out_path, "wb").close()
    except BaseException as e:
        return {"ok": False, "error": "could not stage the input: " + describe(e)}
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            os.dup2(os.open(in_path, os.O_RDONLY), 0)
            os.dup2(os.open(out_path, os.O_WRONLY), 1)
            sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
            sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
            exec(code, {"__name__": "__main__", "__builtins__": builtins})
        except SystemExit as e:
            status = e.code if type(e.code) is int else (0 if e.code is None else 1)
        except BaseException as e:
            _print_traceback(e, skip=1)
            status = 1
        try:
            sys.stdout.flush()
        except BaseException:
            status = status or 1
        os._exit(status & 0xFF)
    _, wait_status = os.waitpid(pid, 0)
    try:
        with open(out_path, "rb") as f:
            out = f.read(MAX_MESSAGE // 2).decode("utf-8", "replace")
    except BaseException:
        out = ""
    for path in (in_path, out_path):
        with contextlib.suppress(OSError):
            os.remove(path)
    return {"ok": True, "stdout": out, "exit": os.waitstatus_to_exitcode(wait_status)}


# ------------------------------------------------------------------------------------------------ checker


class CallFailed(BaseException):
    """A call the candidate did not answer with plain data. A BaseException, so that test code's
    `except Exception` cannot turn a crash or a forged answer into a pass; recorded as well."""


class Channel:
    """The checker's end of the pipes to the candidate, with the execution's deadline."""

    def __init__(self, req_fd, resp_fd, deadline):
        self.req_fd, self.resp_fd, self.deadline = req_fd, resp_fd, deadline
        self.dead, self.timed_out, self.calls, self.failures = "", False, 0, []

    def entered(self) -> str:
        """'' when the candidate reached its jail (it says so before it loads the program, so the program
        cannot take it back), else why not: the sandbox, not the program, failed."""
        try:
            answer = receive(self.resp_fd, self.deadline)
        except (Timeout, Closed, OSError, ValueError, TypeError, RecursionError) as e:
            return "the candidate could not enter its sandbox" + (f" ({describe(e)})" if str(e) else "")
        return "" if answer.get("entered") is True else "the candidate could not enter its sandbox"

    def ready(self) -> str:
        """'' when the program loaded, else why not."""
        try:
            answer = receive(self.resp_fd, self.deadline)
        except Timeout:
            self.timed_out, self.dead = True, "timed out while loading the program"
        except (Closed, OSError):
            self.dead = "the candidate process ended while loading the program"
        except (ValueError, TypeError, RecursionError):
            self.dead = "the candidate sent a malformed message"
        else:
            if answer.get("ok") is not True:
                self.dead = str(answer.get("error", "the program did not load"))[:300]
        return self.dead

    def request(self, what: str, message: dict) -> dict:
        if self.dead:
            self.fail(f"{what}: not run, {self.dead}")
        self.calls += 1
        message["id"] = self.calls
        try:
            send(self.req_fd, message)
            answer = receive(self.resp_fd, self.deadline)
        except Timeout:
            self.timed_out, self.dead = True, "timed out"
            self.fail(f"{what}: timed out")
        except (Closed, OSError):
            self.dead = "the candidate process died"
            self.fail(f"{what}: the candidate process died")
        except (ValueError, TypeError, RecursionError) as e:
            self.dead = "the candidate sent a malformed message"
            self.fail(f"{what}: malformed answer ({describe(e)})")
        if answer.get("id") != message["id"]:
            self.dead = "the candidate answered out of turn"
            self.fail(f"{what}: answer out of turn")
        return answer

    def fail(self, text: str):
        self.failures.append(text)
        raise CallFailed(text)


def _raise_as(name, text):
    """An exception the candidate raised, rebuilt in the checker: a builtin type by name (so tests that
    expect a ValueError work), else `CandidateRaised`. Stopping exceptions become failures."""
    kind = getattr(builtins, str(name), None)
    if isinstance(kind, type) and issubclass(kind, Exception) and name not in STOPPING_EXCEPTIONS:
        try:
            return kind(str(text))
        except BaseException:
            pass
    return CandidateRaised(f"{text}")


class CandidateRaised(Exception):
    pass


def _mutable_update(original, new) -> None:
    """Make an argument the candidate changed in place look changed here too."""
    if type(original) is list and type(new) is list and original != new:
        original[:] = new
    elif (
        type(original) is dict
        and type(new) is dict
        and original != new
        or type(original) is set
        and type(new) is set
        and original != new
    ):
        original.clear()
        original.update(new)


class Proxy:
    """Stands for the candidate's function `name` in the checker's namespace."""

    def __init__(self, channel: Channel, name: str):
        self._channel, self._name = channel, name

    def __repr__(self):
        return f"<candidate {self._name}>"

    def __call__(self, *args, **kwargs):
        channel, name = self._channel, self._name
        what = f"{name}({_shorten(args, kwargs)})"
        try:
            encoded_args, encoded_kwargs = encode(list(args)), encode(kwargs)
        except NotPlain as e:
            raise TypeError(f"{what}: cannot pass {e} to the candidate (only plain data crosses)") from None
        answer = channel.request(what, {"op": "call", "name": name, "args": encoded_args.decode("utf-8", "surrogatepass"),
                                        "kwargs": encoded_kwargs.decode("utf-8", "surrogatepass")})  # fmt: skip
        if "raised" in answer and type(answer["raised"]) is list and len(answer["raised"]) == 2:
            raise _raise_as(*answer["raised"])
        if answer.get("ok") is not True:
            channel.fail("{}: {}".format(what, str(answer.get("error", "failed"))[:300]))
        try:
            value = decode(str(answer["value"]).encode("utf-8", "surrogatepass"))
            new_args = decode(str(answer["args"]).encode("utf-8", "surrogatepass"))
            new_kwargs = decode(str(answer["kwargs"]).encode("utf-8", "surrogatepass"))
        except (KeyError, ValueError, TypeError, RecursionError) as e:
            channel.fail(f"{what}: the answer is not plain data ({describe(e)})")
        if type(new_args) is list and len(new_args) == len(args):
            for old, new in zip(args, new_args, strict=False):
                _mutable_update(old, new)
        if type(new_kwargs) is dict:
            for key, old in kwargs.items():
                _mutable_update(old, new_kwargs.get(key))
        return value


def _shorten(args, kwargs) -> str:
    text = ", ".join([repr(a) for a in args] + ["{}={!r}".format(*kv) for kv in kwargs.items()])
    return text if len(text) <= 80 else text[:77] + "..."


def _free_names(sources) -> tuple[list, set]:
    """(names the test code calls but does not define: the candidate's functions (MBPP, the synthetic task),
    names it reads attributes of: modules it may use without importing them), from one parse."""
    import ast

    called, bound, bases = set(), set(), set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                called.add(node.func.id)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                bases.add(node.value.id)
    return sorted(n for n in called - bound if not hasattr(builtins, n)), bases - bound


def _import_free_modules(ns, names) -> None:
    """Standard-library modules the tests use without importing them (MBPP tests lean on the solution's
    `import math`): imported here, in the checker, from the standard library only."""
    import importlib

    for name in sorted(names):
        if name not in ns and not hasattr(builtins, name) and name in sys.stdlib_module_names:
            with contextlib.suppress(ImportError):
                ns[name] = importlib.import_module(name)


def _not_loaded(channel: Channel, total: int) -> dict | None:
    """The report when the candidate's program did not load (None when it did); a candidate that never
    reached its jail is the sandbox's failure, reported as such."""
    not_entered = channel.entered()
    if not_entered:
        return {"setup_error": not_entered}
    error = channel.ready()
    if not error:
        return None
    return {"passed": 0, "total": total, "error": error, "load_failed": True, "timed_out": channel.timed_out}


def _runnable_prompt(prompt: str) -> str:
    """HumanEval's prompt as checker setup (its helpers, e.g. `poly`, are used by the tests). A prompt that
    ends in a bare `def` line gets a stub body; one that still does not compile defines nothing."""
    for text in (prompt, prompt.rstrip() + "\n    pass\n"):
        try:
            compile(text, "<prompt>", "exec")
            return text
        except SyntaxError:
            continue
    return ""


def run_checks(checks: dict, channel: Channel) -> dict:
    """Run the trusted test code; the verdict of each test is "ran to its end, no call failed"."""
    kind = checks["kind"]
    if kind == "stdio":
        return _run_stdio(checks, channel)
    ns = {"__name__": "__checker__", "__builtins__": builtins}
    modules: set = set()  # HumanEval's tests import what they use
    if kind == "humaneval":
        setup, tests = _runnable_prompt(checks.get("prompt") or ""), [checks["test"]]
        names = [checks["entry_point"]]
    else:
        setup, tests = checks.get("setup") or "", list(checks["tests"])
        names, modules = _free_names([setup, *tests]) if tests else ([], set())
    try:
        exec(compile(setup, "<test setup>", "exec"), ns)
        _import_free_modules(ns, modules)
    except BaseException as e:
        return {"passed": 0, "total": len(tests), "error": "the problem's own test setup failed: " + describe(e),
                "setup_failed": True}  # fmt: skip
    not_loaded = _not_loaded(channel, len(tests))
    if not_loaded:
        return not_loaded
    for name in names:
        ns[name] = Proxy(channel, name)
    passed, failed, first_error = 0, [], ""
    for i, test in enumerate(tests):
        before = len(channel.failures)
        try:
            exec(compile(test, f"<test {i}>", "exec"), ns)
            if kind == "humaneval":
                ns["check"](ns[checks["entry_point"]])
            ok = len(channel.failures) == before
            error = channel.failures[before] if not ok else ""
        except BaseException as e:
            recorded = len(channel.failures) > before
            ok, error = False, (channel.failures[before] if recorded else describe(e) + _where(e, test))
        if ok:
            passed += 1
        else:
            failed.append(i)
            first_error = first_error or (f"test {i}: {error}" if kind != "humaneval" else error)
    return {"passed": passed, "total": len(tests), "failed": failed, "error": first_error,
            "timed_out": channel.timed_out}  # fmt: skip


def _where(exc, source: str) -> str:
    """' at line N: <the test line>' for the innermost frame of the test code an exception passed through."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith("<test"):
            line = tb.tb_lineno
        tb = tb.tb_next
    lines = source.splitlines()
    if line is None or not 0 < line <= len(lines):
        return ""
    return f" at line {line}: {_clip(lines[line - 1].strip(), 160)}"


def _tokens(text: str) -> list:
    return text.split()


def _run_stdio(checks: dict, channel: Channel) -> dict:
    inputs, outputs = list(checks["inputs"]), list(checks["outputs"])
    not_loaded = _not_loaded(channel, len(inputs))
    if not_loaded:
        return not_loaded
    passed, failed, first_error = 0, [], ""
    for i, (given, expected) in enumerate(zip(inputs, outputs, strict=False)):
        error = ""
        try:
            answer = channel.request(f"input {i}", {"op": "main", "stdin": str(given)})
            out = answer.get("stdout")
            if answer.get("ok") is not True or type(out) is not str:
                error = "no output ({})".format(str(answer.get("error", "failed"))[:200])
            elif answer.get("exit") != 0:
                error = "input {!r}: the program exited with status {}".format(
                    _clip(given), answer.get("exit")
                )
            elif _tokens(out) != _tokens(str(expected)):
                error = f"input {_clip(given)!r} gave {_clip(out)!r}, expected {_clip(expected)!r}"
        except CallFailed as e:
            error = str(e)
        if error:
            failed.append(i)
            first_error = first_error or f"test {i}: {error}"
        else:
            passed += 1
    return {"passed": passed, "total": len(inputs), "failed": failed, "error": first_error,
            "timed_out": channel.timed_out}  # fmt: skip


def _clip(text, n=100) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 3] + "..."


# ------------------------------------------------------------------------------------------------ containment


class Libc:
    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def call(self, name, *args):
        if getattr(self.lib, name)(*args) != 0:
            err = self.ctypes.get_errno()
            raise OSError(err, f"{name}{args!r}: {os.strerror(err)}")

    def mount(self, source, target, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()  # noqa: E731
        self.call("mount", enc(source), enc(target), enc(fstype), self.ctypes.c_ulong(flags), enc(data))

    def prctl(self, option, value):
        c_ulong = self.ctypes.c_ulong
        self.call("prctl", c_ulong(option), c_ulong(value), c_ulong(0), c_ulong(0), c_ulong(0))


def build_jail(cfg, libc) -> None:
    """The filesystem a sandboxed process sees: a tmpfs holding read-only binds of the Python installation
    (and the system libraries its extension modules load), /dev/null, /dev/urandom, the namespace's own
    /proc, and the two work directories. Nothing else of the machine."""
    if os.readlink("/proc/self/ns/mnt") == cfg["host_mnt_ns"]:
        raise RuntimeError("not in a private mount namespace")  # never touch the host's mounts
    jail = cfg["jail"]
    libc.mount("tmpfs", jail, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")

    def bind(source, read_only, is_dir=True):
        target = jail + source
        if is_dir:
            os.makedirs(target, 0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
            open(target, "a").close()
        libc.mount(source, target, None, MS_BIND | MS_REC)
        flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (MS_RDONLY if read_only else 0)
        libc.mount(None, target, None, flags | (0 if not is_dir else MS_NODEV))

    for path in cfg["read_only"]:
        if os.path.isdir(path):
            bind(path, True)
        elif os.path.isfile(path):
            bind(path, True, is_dir=False)
    for link, target in cfg["links"]:
        if not os.path.lexists(jail + link):
            os.makedirs(os.path.dirname(jail + link), 0o755, exist_ok=True)
            os.symlink(target, jail + link)
    for device in ("/dev/null", "/dev/urandom"):
        bind(device, False, is_dir=False)
    os.makedirs(jail + "/proc", 0o555, exist_ok=True)
    libc.mount("proc", jail + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for role, work in cfg["work_dirs"].items():  # a bounded tmpfs each: filling it costs only this execution
        os.makedirs(jail + work, 0o755, exist_ok=True)
        uid = cfg["uids"][role]
        size = f"size={cfg['limits']['work_dir_bytes']},nr_inodes=16384,mode=700,uid={uid},gid={uid}"
        libc.mount("tmpfs", jail + work, "tmpfs", MS_NOSUID | MS_NODEV, size)


def set_limits(cfg) -> None:
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
        nproc += _user_tasks(os.getuid())
    if cfg["nproc"] != "none":
        lower(resource.RLIMIT_NPROC, nproc, nproc)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def _user_tasks(uid) -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            if int(status["Uid"].split()[0]) == uid:
                n += int(status.get("Threads", "1"))
        except (OSError, ValueError, KeyError):
            pass
    return n


def enter(cfg, role, libc, keep) -> None:
    """Become `role` (candidate or checker): close every descriptor but `keep` and 0-2, enter the jail,
    set the limits, drop to the role's uid."""
    _close_all_but(keep)
    work = cfg["work_dirs"][role]
    if cfg["namespaces"]:
        os.chroot(cfg["jail"])
    os.chdir(work)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": work})
    set_limits(cfg)
    uid = cfg["uids"][role] if cfg["uids"] else None
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        try:
            os.setuid(0)
        except OSError:
            pass
        else:
            raise RuntimeError("could regain root after dropping privileges")
        if os.getuid() != uid or os.geteuid() != uid or os.getgid() != uid:
            raise RuntimeError("privileges not dropped")
    if libc is not None:
        libc.prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
        # the checker is never dumpable: no same-uid ptrace or /proc/<pid>/{mem,fd} (the basic tier's guard)
        libc.prctl(4, 0 if role == "checker" else 1)  # PR_SET_DUMPABLE


def _close_all_but(keep) -> None:
    """Close every descriptor above 2 except `keep`: the open ones as /proc lists them (closing all 65,536
    possible numbers one by one costs milliseconds), every number when /proc cannot be read."""
    keep = set(keep)
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        open_fds = range(3, 1 << 16)
    for fd in open_fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def supervise(pid, watchdog) -> int:
    """Wait for `pid` (reaping every orphan re-parented here); the watchdog ends a stuck execution."""
    import signal

    signal.signal(signal.SIGALRM, lambda *_: os._exit(128 + signal.SIGALRM))
    signal.setitimer(signal.ITIMER_REAL, watchdog)
    while True:
        try:
            wpid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        if wpid == pid:
            return os.waitstatus_to_exitcode(status)


def report(fd, result: dict) -> None:
    data = json.dumps(result).encode("utf-8", "surrogatepass")
    while data:
        data = data[os.write(fd, data) :]


def _flush_and_exit(code: int) -> None:
    _flush()
    os._exit(code)


def main() -> None:
    """Set up (config, jail, pipes), then wait for the job: a warm sandbox waits here until it gets one.
    The job pipe carries the program first and the checks second; the candidate is forked in between."""
    path = sys.argv[1]
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    os.remove(path)
    libc = Libc() if sys.platform.startswith("linux") else None
    if libc is not None:
        libc.prctl(4, 0)  # the supervisor holds the checks for a moment: not dumpable either
    result_fd, job_fd = cfg["result_fd"], cfg["job_fd"]
    try:
        if cfg["namespaces"]:
            build_jail(cfg, libc)
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
    except BaseException as e:
        report(result_fd, {"setup_error": describe(e)})
        os._exit(125)
    try:
        job = receive(job_fd, time.monotonic() + cfg["idle_seconds"])
    except (Timeout, Closed, OSError, ValueError):
        os._exit(0)  # never used (a warm sandbox handed back)
    started = time.monotonic()
    candidate = os.fork()
    if candidate == 0:  # the checks are still in the pipe: never read into this process
        try:
            enter(cfg, "candidate", libc, (req_r, resp_w))
        except BaseException as e:
            print(f"sandbox setup failed: {describe(e)}", file=sys.stderr)
            os._exit(125)
        send(resp_w, {"entered": True})  # before the program exists: it cannot forge or withhold this
        sys.path.extend(p for p in cfg["site_paths"] if p not in sys.path)  # started with -S
        serve(job["program"], req_r, resp_w, bool(job.get("whole")))
        _flush_and_exit(0)
    del job
    os.close(req_r)
    os.close(resp_w)
    try:
        checks = receive(job_fd, started + float(cfg["timeout"]))
    except (Timeout, Closed, OSError, ValueError) as e:
        report(result_fd, {"setup_error": "no checks: " + describe(e)})
        os._exit(125)
    os.close(job_fd)
    checker = os.fork()
    if checker == 0:
        try:
            enter(cfg, "checker", libc, (req_w, resp_r, result_fd))
        except BaseException as e:
            report(result_fd, {"setup_error": describe(e)})
            os._exit(125)
        try:
            result = run_checks(checks, Channel(req_w, resp_r, started + float(cfg["timeout"])))
        except BaseException as e:
            result = {"setup_error": "checker: " + describe(e)}
        _flush()
        report(result_fd, result)
        os._exit(0)
    del checks
    for fd in (req_w, resp_r, result_fd):
        os.close(fd)
    code = supervise(checker, cfg["watchdog"])
    if not cfg["namespaces"]:  # no namespace to take the candidate down with us
        with contextlib.suppress(OSError):
            os.kill(candidate, 9)
    os._exit(0 if code == 0 else 1)


if __name__ == "__main__":
    main()
