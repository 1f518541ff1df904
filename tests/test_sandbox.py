"""Tests for the sandboxed executor: results, limits, and hostile programs that must stay contained.
(Forgeries of the verdict have their own catalogue: tests/test_sandbox_forgery.py.)"""

from __future__ import annotations

import ast
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from pipeline.sandbox import (
    MAX_OUTPUT_CHARS,
    AssertTests,
    ExecResult,
    HumanEvalTest,
    Limits,
    StdioTests,
    isolation,
    run_humaneval,
    run_many,
    run_tests,
    strip_code_fence,
)

ADD_ONE = "def f(x):\n    return x + 1\n"
CHECK_F = "def check(candidate):\n    assert candidate(1) == 2\n"  # HumanEval's shape, entry point f
MARGIN = 1.5  # seconds of interpreter start-up and teardown allowed on top of a timeout


def _namespaces() -> bool:
    return isolation().namespaces


@pytest.fixture
def _ns_sandbox():
    if not _namespaces():
        pytest.skip(f"namespace sandbox unavailable here: {isolation().reason}")


needs_namespaces = pytest.mark.usefixtures("_ns_sandbox")


def _marker() -> str:
    return "sbx" + secrets.token_hex(5)  # 13 chars: fits a process name (comm, 15 chars)


def _marked(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line or name carries ``marker``, as seen from the host."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline or comm == marker:
            found.append(int(pid))
    return found


def _kill_marked(marker: str) -> None:
    """Safety net: whatever containment did, leave nothing running."""
    for _ in range(20):
        pids = _marked(marker)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _none_left(marker: str, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while _marked(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _tag(marker: str) -> str:
    """Program prefix naming the process after ``marker``, so leftovers can be found from the host."""
    return f"with open('/proc/self/comm', 'w') as _f:\n    _f.write({marker!r})\n"


@pytest.fixture
def marker():
    m = _marker()
    yield m
    _kill_marked(m)


# ------------------------------------------------------------------------------------------- results


def test_all_tests_pass():
    res = run_tests(ADD_ONE, ["assert f(1) == 2", "assert f(-1) == 0"])
    assert res == ExecResult("passed", 2, 2, "", "")
    assert res.fraction == 1.0
    assert 0 < res.elapsed < 5


def test_partial_failure_counts_each_test_separately():
    tests = ["assert f(1) == 2", "assert f(1) == 3", "assert g(1) == 2", "assert f(10) == 11"]
    res = run_tests(ADD_ONE + "print('hello')", tests)
    assert (res.status, res.passed, res.total) == ("failed", 2, 4)
    assert res.fraction == 0.5
    assert res.stdout == "hello\n"
    assert res.error == "test 1: AssertionError at line 1: assert f(1) == 3"
    assert res.failed_tests == (1, 2)


def test_zero_tests():
    res = run_tests(ADD_ONE, [])
    assert (res.status, res.passed, res.total, res.fraction) == ("passed", 0, 0, 0.0)


@pytest.mark.parametrize(
    ("program", "needle"),
    [
        ("def f(x)\n    return x", "SyntaxError"),
        ("raise ValueError('boom')", "ValueError"),
        ("import sys\nsys.exit(0)", "SystemExit"),
        ("import no_such_module_xyz", "ModuleNotFoundError"),
    ],
)
def test_program_that_does_not_exec_is_crashed(program, needle):
    res = run_tests(program, ["assert True", "assert 1 == 1"])
    assert (res.status, res.passed, res.total) == ("crashed", 0, 2)
    assert needle in res.stderr and needle in res.error
    assert "harness" not in res.stderr  # the traceback starts at the program


def test_main_block_does_not_run():
    # stdin is /dev/null: input() would raise if the program ran as __main__
    res = run_tests(ADD_ONE + "if __name__ == '__main__':\n    input()\n", ["assert f(0) == 1"])
    assert res.status == "passed"


def test_humaneval_mode():
    ok = run_humaneval(ADD_ONE, CHECK_F, "f")
    assert ok == ExecResult("passed", 1, 1, "", "")
    bad = run_humaneval("def f(x):\n    return x\n", CHECK_F.replace("== 2", "== 2, 'off by one'"), "f")
    assert (bad.status, bad.passed, bad.total) == ("failed", 0, 1)
    assert bad.error == "AssertionError: off by one at line 2: assert candidate(1) == 2, 'off by one'"
    syntax = run_humaneval("def f(:\n", CHECK_F, "f")
    assert syntax.status == "crashed" and syntax.error.startswith("SyntaxError")


@pytest.mark.parametrize(
    "exit_code", ["import sys\nsys.exit(0)\n", "raise SystemExit\n", "exit()\n", "import os\nos._exit(0)\n"]
)
def test_exit_before_the_tests_is_not_a_pass(exit_code, marker):
    # The completion exits with status 0 before the test code after it runs: never a pass.
    whole = run_humaneval(_tag(marker) + ADD_ONE + exit_code, CHECK_F, "f")
    assert whole.status == "crashed" and whole.passed == 0
    per_test = run_tests(_tag(marker) + ADD_ONE + exit_code, ["assert f(1) == 2"])
    assert per_test.status == "crashed" and per_test.passed == 0
    assert _none_left(marker)


def test_run_many_keeps_input_order_and_mixes_modes():
    jobs = [
        (ADD_ONE, ["assert f(1) == 2"]),
        ("def f(", ["assert f(1) == 2"]),
        (ADD_ONE, ["assert f(1) == 2", "assert f(1) == 5"]),
        ("def g():\n    return 3\n", ["assert g() == 3"]),
        (ADD_ONE, HumanEvalTest(CHECK_F, "f")),
        ("def f(x):\n    return x\n", HumanEvalTest(CHECK_F, "f")),
    ] * 2
    results = run_many(jobs, timeout=5.0, workers=2)
    assert [r.status for r in results] == ["passed", "crashed", "failed", "passed", "passed", "failed"] * 2
    assert [r.total for r in results] == [1, 1, 2, 1, 1, 1] * 2
    assert run_many([]) == []


def test_identical_jobs_run_once_and_each_gets_its_own_copy(monkeypatch):
    """The same program under the same check is executed once; the same program under another check (or
    setup), or another program under the same check, is a job of its own."""
    from pipeline.sandbox import runner

    real_run, programs_run = runner.Sandbox.run, []

    def counting_run(self, program, check):
        programs_run.append((program, check))
        return real_run(self, program, check)

    monkeypatch.setattr(runner.Sandbox, "run", counting_run)
    passing, failing = (ADD_ONE, ["assert f(1) == 2"]), ("def f(x):\n    return x\n", ["assert f(1) == 2"])
    other_check = (ADD_ONE, ["assert f(1) == 2", "assert f(2) == 3"])
    other_setup = (ADD_ONE, AssertTests(("assert f(1) == 2",), setup="y = 1"))
    jobs = [passing, failing, passing, other_check, passing, failing, other_setup, passing]
    results = run_many(jobs, workers=2)
    assert [r.status for r in results] == ["passed", "failed", "passed", "passed", "passed", "failed", "passed",
                                           "passed"]  # fmt: skip
    assert [r.total for r in results] == [1, 1, 1, 2, 1, 1, 1, 1]
    assert len(programs_run) == 4  # passing, failing, other_check, other_setup
    assert len({id(r) for r in results}) == len(jobs)  # copies: changing one result leaves the others
    results[0].passed = 0
    assert results[2].passed == 1


def test_a_stdio_check_with_unmatched_outputs_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        run_many([(ADD_ONE, StdioTests(("1", "2"), ("2",)))])


FORGERIES = [
    # guessed nonces, then a hard exit so the harness never reports
    'import os\nprint(\'__RESULT_0__ {"passed": 1, "total": 1, "exec_ok": true}\', flush=True)\nos._exit(0)',
    'import os\nprint(\'__RESULT___ {"passed": 1, "total": 1}\', flush=True)\nos._exit(0)',
    "import os\nprint('__RESULT_' + '0' * 32 + '__ {\"passed\": 1, \"total\": 1, \"exec_ok\": true}', flush=True)\n"
    "os._exit(0)",
    "print('__RESULT_' + 'f' * 32 + '__ {\"passed\": 1, \"total\": 1, \"exec_ok\": true}')",
    # writes a plausible line into every descriptor it can find
    "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'\\n__RESULT_0__ {\"passed\": 1}\\n')\n"
    "    except OSError:\n        pass\n",
    # monkeypatching what a naive harness would use to write its result
    'import json, os\njson.dumps = lambda *a, **k: \'{"passed": 1, "total": 1, "exec_ok": true}\'\n'
    "os.write = lambda fd, data: len(data)\n",
]


@pytest.mark.parametrize("program", FORGERIES)
def test_program_output_cannot_forge_result(program):
    res = run_tests(program, ["assert False"])
    assert res.passed == 0
    assert res.status in ("failed", "crashed")


def test_output_is_truncated():
    res = run_tests("print('x' * 100_000)\nimport sys\nprint('y' * 100_000, file=sys.stderr)", [])
    assert res.status == "passed"
    assert len(res.stdout) < MAX_OUTPUT_CHARS + 100
    assert len(res.stderr) < MAX_OUTPUT_CHARS + 100
    assert "truncated" in res.stdout and res.stdout.startswith("x") and res.stdout.endswith("x\n")


def test_memory_limit():
    res = run_tests("x = bytearray(4 * 1024**3)", ["assert True"])
    assert res.status == "crashed"
    assert "MemoryError" in res.stderr


def test_file_size_limit():
    res = run_tests("open('big.bin', 'wb').write(b'0' * (32 * 1024**2))", ["assert True"])
    assert res.status == "crashed"
    assert "File too large" in res.stderr


def test_cpu_time_limit_holds_without_wall_clock():
    # A CPU-bound loop with a long wall-clock timeout still ends at the CPU limit.
    start = time.monotonic()
    res = run_tests("def spin():\n    while True:\n        pass\n", ["spin()"], timeout=30,
                    limits=Limits(cpu_seconds=1))  # fmt: skip
    assert time.monotonic() - start < 1 + 1 + MARGIN + 1  # soft limit, then SIGKILL one second later
    assert res.status == "failed" and res.error == "test 0: spin(): the candidate process died"


# ----------------------------------------------------------------------------------- hostile programs


def test_infinite_loop_times_out_within_limit(marker):
    start = time.monotonic()
    res = run_tests(_tag(marker) + "while True:\n    pass\n", ["assert True"], timeout=1.0)
    assert (res.status, res.passed, res.total) == ("timeout", 0, 1)
    assert time.monotonic() - start < 1.0 + MARGIN
    assert res.error == "timed out while loading the program"
    assert _none_left(marker)


def _spawn_sleepers(marker: str) -> str:
    """Program text starting a background child and one that leaves the process group (setsid)."""
    return (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}],"
        " start_new_session=True)\n"
        "time.sleep(0.3)\n"
    )


def test_timeout_kills_every_descendant(marker):
    # A background grandchild, one that left the process group (setsid), and a test that sleeps (no CPU):
    # the wall-clock timeout must end all of them.
    program = _spawn_sleepers(marker) + "print('started', flush=True)\ndef f():\n    time.sleep(60)\n"
    start = time.monotonic()
    res = run_tests(program, ["f()"], timeout=1.5)
    assert time.monotonic() - start < 1.5 + MARGIN
    assert res.status == "timeout"
    assert res.stdout == "started\n"  # output written before the timeout is kept
    if not _namespaces():
        pytest.skip("without a PID namespace a setsid() escapee survives the group kill")
    assert _none_left(marker)


def test_stray_children_killed_after_normal_exit(marker):
    res = run_tests(_spawn_sleepers(marker), ["assert True"])
    assert res.status == "passed"
    if not _namespaces():
        pytest.skip("without a PID namespace a setsid() escapee survives the group kill")
    assert _none_left(marker)


FORK_BOMB = """
import os, time
with open("/proc/self/comm", "w") as f:
    f.write({marker!r})
me = os.getpid()
blocked = 0
for _ in range(10):  # at most 2**10 processes even if nothing contained it
    try:
        os.fork()
    except OSError:
        blocked += 1
if os.getpid() == me:
    time.sleep(0.5)
    alive = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/comm" % pid) as f:
                alive += f.read().strip() == {marker!r}
        except OSError:
            pass
    print("blocked=%d alive=%d" % (blocked, alive), flush=True)
time.sleep(60)
"""


def test_fork_bomb_is_capped_and_cleaned_up(marker):
    if not isolation().process_limit:
        pytest.skip(f"RLIMIT_NPROC does not bind here ({isolation().reason})")
    cap = 8
    start = time.monotonic()
    try:
        res = run_tests(
            FORK_BOMB.format(marker=marker), ["assert True"], timeout=2.0, limits=Limits(max_processes=cap)
        )
    finally:
        leftovers = not _none_left(marker)
        _kill_marked(marker)
    assert time.monotonic() - start < 2.0 + MARGIN
    assert res.status == "timeout"
    blocked, alive = (int(part.split("=")[1]) for part in res.stdout.split())
    assert blocked >= 1  # forks were refused ...
    assert alive <= cap  # ... at the cap
    assert not leftovers


def test_allocating_50_gb_fails_fast(marker):
    start = time.monotonic()
    res = run_tests(
        _tag(marker) + "def grab():\n    return len(bytearray(50 * 1024**3))\n", ["grab()"], timeout=2.0
    )
    assert time.monotonic() - start < 2.0 + MARGIN
    assert res.status == "failed" and res.error.startswith("test 0: MemoryError")
    res = run_tests(_tag(marker) + "x = b'x' * (50 * 1024**3)", ["assert True"], timeout=2.0)
    assert res.status == "crashed" and "MemoryError" in res.stderr
    assert _none_left(marker)


def test_printing_100_mb_is_capped(marker):
    start = time.monotonic()
    program = _tag(marker) + "import sys\nsys.stdout.write('x' * 100_000_000)\nsys.stdout.flush()\n"
    res = run_tests(program, ["assert True"], timeout=5.0)
    assert time.monotonic() - start < 5.0
    assert _none_left(marker)
    assert res.status == "crashed"
    assert "File too large" in res.stderr
    assert len(res.stdout) < MAX_OUTPUT_CHARS + 100 and "bytes truncated" in res.stdout


@pytest.fixture
def open_dir():
    """A directory anyone may write to, outside the sandbox's work dir: only the sandbox can stop a write."""
    path = tempfile.mkdtemp(prefix="sandbox-outside-")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_namespaces
def test_writes_outside_the_work_dir_are_blocked(open_dir, marker):
    targets = [
        os.path.join(open_dir, "escape.txt"),
        os.path.join(tempfile.gettempdir(), f"{marker}.txt"),
        f"/dev/shm/{marker}.txt",
        f"/var/tmp/{marker}.txt",
        os.path.join(os.getcwd(), f"{marker}.txt"),
    ]
    program = (
        "import os\n"
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('pwned')\n"
        "        print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        print('blocked', type(e).__name__)\n"
        "with open('inside.txt', 'w') as f:\n"
        "    f.write('fine')\n"
        "import tempfile\n"
        "with tempfile.NamedTemporaryFile() as f:\n"  # TMPDIR points into the work dir
        "    f.write(b'fine')\n"
        "def inside():\n"
        "    return open('inside.txt').read()\n"
    )
    try:
        res = run_tests(program, ["assert inside() == 'fine'"])
        assert res.status == "passed", res
        assert "WROTE" not in res.stdout and res.stdout.count("blocked") == len(targets)
        assert not any(os.path.exists(t) for t in targets)
    finally:
        for t in targets:
            with contextlib.suppress(OSError):
                os.remove(t)


def test_secrets_in_the_environment_are_not_visible(monkeypatch):
    secrets_env = {
        "WANDB_API_KEY": "wandb-secret-1234",
        "OPENAI_API_KEY": "sk-secret-5678",
        "HF_TOKEN": "hf-secret-9012",
        "HTTPS_PROXY": "http://proxy-secret:3128",
        "http_proxy": "http://proxy-secret:3128",
    }
    for key, value in secrets_env.items():
        monkeypatch.setenv(key, value)
    program = (
        "import os\n"
        "print(dict(os.environ))\n"
        f"for pid in ('self', '1', {str(os.getpid())!r}, str(os.getppid())):\n"
        "    try:\n"
        "        print(open('/proc/%s/environ' % pid, 'rb').read())\n"
        "    except OSError as e:\n"
        "        print(pid, type(e).__name__)\n"
    )
    res = run_tests(program, [])
    assert res.status == "passed"
    for key, value in secrets_env.items():
        assert value not in res.stdout and value not in res.stderr, key
    seen = ast.literal_eval(res.stdout.splitlines()[0])  # the program's os.environ, printed as a dict
    assert set(seen) <= {"PATH", "LANG", "TMPDIR", "LC_CTYPE"}


def test_environment_is_scrubbed_and_cwd_is_temporary(monkeypatch):
    monkeypatch.setenv("SANDBOX_SECRET_TOKEN", "hunter2")
    res = run_tests("import os\nprint(sorted(os.environ))\nprint(os.getcwd())", [])
    env_line, cwd = res.stdout.splitlines()
    assert "SANDBOX_SECRET_TOKEN" not in env_line and "HOME" not in env_line
    assert cwd != os.getcwd()
    assert not os.path.exists(cwd)  # the temporary directory is removed afterwards


@needs_namespaces
@pytest.mark.parametrize(
    "attack",
    [
        "os.kill(os.getppid(), signal.SIGKILL)",
        "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
        "os.kill(-1, signal.SIGKILL)",
        "os.kill({parent}, signal.SIGKILL)",
    ],
)
def test_killing_the_parent_fails_and_the_run_survives(attack, marker):
    # A bystander process of ours, which kill(-1) would hit if the program ran as root.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "bystander"])
    try:
        # assert first: even if something were wrong, never send kill(-1) as root
        program = "import os, signal\nassert os.getuid() != 0\n" + attack.format(parent=os.getpid()) + "\n"
        res = run_tests(_tag(marker) + program, ["assert True"], timeout=3.0)
        assert _none_left(marker)
        assert res.status in ("crashed", "passed")  # passed: kill(-1) found only its own process
        if res.status == "crashed":
            assert any(
                e in res.error for e in ("PermissionError", "ProcessLookupError", "ended while loading")
            ), res
        assert bystander.poll() is None  # our process survived, and so did this test
        again = run_tests(ADD_ONE, ["assert f(1) == 2"])  # the executor still works
        assert again.status == "passed"
    finally:
        bystander.kill()
        bystander.wait()


@needs_namespaces
def test_network_is_unreachable():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # the port really listens
        server.accept()[0].close()
        program = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "except OSError as e:\n"
            "    print('blocked', type(e).__name__, e.errno)\n"
            "else:\n"
            "    print('connected')\n"
        )
        res = run_tests(program, [])
        assert res.stdout.startswith("blocked"), res
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


def test_hostile_jobs_do_not_stall_or_kill_the_pool(marker):
    humaneval = HumanEvalTest(CHECK_F, "f")
    hostile = [
        ("while True:\n    pass\n", ["assert True"]),
        ("import time\ntime.sleep(60)\n", humaneval),
        ("x = bytearray(50 * 1024**3)\n", humaneval),
        ("import os\nos._exit(3)\n", ["assert True"]),
        ("import sys\nsys.stdout.write('x' * 100_000_000)\n", humaneval),
        (FORK_BOMB.format(marker=marker), ["assert True"]),
    ]
    good = [(ADD_ONE, ["assert f(1) == 2"]), (ADD_ONE + "\n", humaneval)] * 3
    jobs = [job for pair in zip(hostile, good, strict=False) for job in pair] + good[len(hostile) :]
    start = time.monotonic()
    try:
        results = run_many(jobs, timeout=1.5, workers=2, limits=Limits(max_processes=8))
    finally:
        _kill_marked(marker)
    # 3 timeouts at most run back to back on 2 workers, plus ~50 ms per other job
    assert time.monotonic() - start < 3 * 1.5 + 10 * 0.5 + MARGIN
    by_program = {program: res for (program, _), res in zip(jobs, results, strict=True)}
    for program, _ in good:
        assert by_program[program].status == "passed"
    for program, _ in hostile:
        assert by_program[program].status != "passed", program
    assert by_program[hostile[3][0]].error == "the candidate process ended while loading the program"


# --------------------------------------------------------------------------------- isolation tiers


def test_namespaces_are_used_where_they_work():
    unshare = shutil.which("unshare")
    if not (sys.platform.startswith("linux") and os.geteuid() == 0 and unshare):
        pytest.skip("namespaces need Linux, root and util-linux unshare")
    probe = subprocess.run([unshare, "--net", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare does not work here: {probe.stderr.decode().strip()}")
    iso = isolation()
    assert (iso.namespaces, iso.private_uid, iso.process_limit, iso.tier) == (True, True, True, "namespaces")
    res = run_tests("import os\ndef where():\n    return os.getuid() >= 2**30, os.getppid()\n",
                    ["assert where() == (True, 1)"])  # fmt: skip
    assert res.status == "passed", res


def test_basic_tier_still_runs_and_times_out(monkeypatch):
    monkeypatch.setenv("PIPELINE_SANDBOX_ISOLATION", "basic")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-5678")
    iso = isolation()
    assert iso.tier == "basic" and not iso.namespaces and iso.reason
    res = run_tests(
        ADD_ONE + "import os\nprint(sorted(os.environ))\n", ["assert f(1) == 2", "assert f(1) == 0"]
    )
    assert (res.status, res.passed) == ("failed", 1)
    assert "OPENAI_API_KEY" not in res.stdout
    start = time.monotonic()
    assert run_humaneval("while True:\n    pass\n", CHECK_F, "f", timeout=1.0).status == "timeout"
    assert time.monotonic() - start < 1.0 + MARGIN


def test_bad_isolation_setting_is_rejected(monkeypatch):
    monkeypatch.setenv("PIPELINE_SANDBOX_ISOLATION", "none")
    with pytest.raises(ValueError, match="PIPELINE_SANDBOX_ISOLATION"):
        isolation()


# ------------------------------------------------------------------------------------------- fences


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("```python\nreturn x\n```", "return x"),
        ("```python\ndef f(x):\n    return x\n```", "def f(x):\n    return x"),
        ("  \n```\nprint(1)\n```\n\n", "print(1)"),
        ("```py\nx = 1\ny = 2\n```", "x = 1\ny = 2"),
        ("````python\n```\nnested\n```\n````", "```\nnested\n```"),
        ("def f(x):\n    return x", "def f(x):\n    return x"),
        ("python\nreturn x", "python\nreturn x"),
        ("```python\nreturn x", "```python\nreturn x"),
        (
            "```python\na = 1\n```\ntext\n```python\nb = 2\n```",
            "```python\na = 1\n```\ntext\n```python\nb = 2\n```",
        ),
        ("Here:\n```python\nx = 1\n```", "Here:\n```python\nx = 1\n```"),
        ("", ""),
    ],
)
def test_strip_code_fence(text, expected):
    assert strip_code_fence(text) == expected


def test_stripped_fenced_program_runs():
    res = run_tests(strip_code_fence(f"```python\n{ADD_ONE}```"), ["assert f(2) == 3"])
    assert res.status == "passed"


# --------------------------------------------------------------------------------- sandbox failures


def test_a_sandbox_that_cannot_start_is_retried_then_an_error(monkeypatch):
    """A sandbox failure is never scored as the program's: retried in a fresh sandbox, then an error."""
    from pipeline.sandbox import SandboxUnavailable, runner

    real_popen, calls = runner.subprocess.Popen, {"n": 0, "fail": 1}

    def flaky_popen(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= calls["fail"]:
            raise OSError("no process slots left")
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(runner.subprocess, "Popen", flaky_popen)
    res = run_tests(ADD_ONE, ["assert f(1) == 2"])
    assert (res.status, res.passed, calls["n"]) == ("passed", 1, 2)

    calls.update(n=0, fail=10**6)
    with pytest.raises(SandboxUnavailable, match="could not run a program 3 times.*no process slots left"):
        run_tests(ADD_ONE, ["assert f(1) == 2"])
    assert calls["n"] == 3
    calls.update(n=0)
    with pytest.raises(SandboxUnavailable):
        run_many([(ADD_ONE, ["assert f(1) == 2"])] * 2, workers=1)


def test_a_candidate_that_cannot_enter_its_jail_is_the_sandboxs_failure(monkeypatch):
    """The candidate says it is in its jail before the program loads; without that word the execution is
    the sandbox's failure ("error"), not a program that crashed while loading."""
    from pipeline.sandbox.runner import Sandbox

    monkeypatch.setenv("PIPELINE_SANDBOX_ISOLATION", "basic")
    sandbox = Sandbox(False, Limits(), 5.0)
    work = os.path.join(os.path.dirname(sandbox.out_path), "work-candidate")
    os.rmdir(work)  # the candidate's chdir into it fails: a set-up failure, before any program exists
    res = sandbox.run(ADD_ONE, AssertTests(("assert f(1) == 2",)))
    assert res.status == "error" and "could not enter its sandbox" in res.error, res
    # a program that ends itself while loading is still the program's failure
    res = run_tests("import os\nos._exit(0)\n", ["assert f(1) == 2"])
    assert (res.status, res.error) == ("crashed", "the candidate process ended while loading the program")
