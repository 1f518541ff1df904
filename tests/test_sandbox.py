"""Tests for the minimal subprocess sandbox."""

from __future__ import annotations

import os
import time

import pytest

from pipeline.sandbox import MAX_OUTPUT_CHARS, ExecResult, run_many, run_tests, strip_code_fence

ADD_ONE = "def f(x):\n    return x + 1\n"


def _is_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (absent, or a zombie nobody reaped: PID 1 may not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _is_gone(pid):
            return True
        time.sleep(0.05)
    return _is_gone(pid)


def test_all_tests_pass():
    res = run_tests(ADD_ONE, ["assert f(1) == 2", "assert f(-1) == 0"])
    assert res == ExecResult("passed", 2, 2, "", "")
    assert res.fraction == 1.0


def test_partial_failure_counts_each_test_separately():
    tests = ["assert f(1) == 2", "assert f(1) == 3", "assert g(1) == 2", "assert f(10) == 11"]
    res = run_tests(ADD_ONE + "print('hello')", tests)
    assert (res.status, res.passed, res.total) == ("failed", 2, 4)
    assert res.fraction == 0.5
    assert res.stdout == "hello\n"  # the result line is removed from what the caller sees
    assert "assert f(1) == 3" in res.stderr and "NameError" in res.stderr


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
    assert needle in res.stderr


def test_main_block_does_not_run():
    # stdin is /dev/null: input() would raise if the program ran as __main__
    res = run_tests(ADD_ONE + "if __name__ == '__main__':\n    input()\n", ["assert f(0) == 1"])
    assert res.status == "passed"


def test_infinite_loop_times_out_within_limit():
    start = time.monotonic()
    res = run_tests("while True:\n    pass\n", ["assert True"], timeout=1.0)
    elapsed = time.monotonic() - start
    assert (res.status, res.passed, res.total) == ("timeout", 0, 1)
    assert elapsed < 3.0


def test_timeout_in_a_test_and_kills_process_group():
    # A background grandchild and a sleeping (no CPU) test: the wall-clock timeout must kill both.
    program = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "def f():\n    time.sleep(60)\n"
    )
    start = time.monotonic()
    res = run_tests(program, ["f()"], timeout=1.5)
    assert time.monotonic() - start < 4.0
    assert res.status == "timeout"
    pid = int(res.stdout.split()[0])  # output written before the timeout is kept
    assert _wait_gone(pid)


def test_stray_children_killed_after_normal_exit():
    program = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
    )
    res = run_tests(program, ["assert True"])
    assert res.status == "passed"
    assert _wait_gone(int(res.stdout.split()[0]))


FORGERIES = [
    # guessed nonces, then a hard exit so the harness never reports
    'import os\nprint(\'__RESULT_0__ {"passed": 1, "total": 1, "exec_ok": true}\', flush=True)\nos._exit(0)',
    'import os\nprint(\'__RESULT___ {"passed": 1, "total": 1}\', flush=True)\nos._exit(0)',
    # a line of exactly the real format (32 hex digit nonce)
    "import os\nprint('__RESULT_' + '0' * 32 + '__ {\"passed\": 1, \"total\": 1, \"exec_ok\": true}', flush=True)\n"
    "os._exit(0)",
    "print('__RESULT_' + 'f' * 32 + '__ {\"passed\": 1, \"total\": 1, \"exec_ok\": true}')",
    # plausible line, then the program's own tests fail: the harness's real line must win
    'print(\'__RESULT_deadbeef__ {"passed": 1, "total": 1, "exec_ok": true}\')',
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
    assert "truncated" in res.stdout


def test_environment_is_scrubbed_and_cwd_is_temporary(monkeypatch):
    monkeypatch.setenv("SANDBOX_SECRET_TOKEN", "hunter2")
    res = run_tests("import os\nprint(sorted(os.environ))\nprint(os.getcwd())", [])
    env_line, cwd = res.stdout.splitlines()
    assert "SANDBOX_SECRET_TOKEN" not in env_line and "HOME" not in env_line
    assert cwd != os.getcwd()
    assert not os.path.exists(cwd)  # the temporary directory is removed afterwards


def test_memory_limit():
    res = run_tests("x = bytearray(4 * 1024**3)", ["assert True"])
    assert res.status == "crashed"
    assert "MemoryError" in res.stderr


def test_file_size_limit():
    res = run_tests("open('big.bin', 'wb').write(b'0' * (32 * 1024**2))", ["assert True"])
    assert res.status == "crashed"
    assert "File too large" in res.stderr


def test_run_many_keeps_input_order():
    jobs = [
        (ADD_ONE, ["assert f(1) == 2"]),
        ("def f(", ["assert f(1) == 2"]),
        (ADD_ONE, ["assert f(1) == 2", "assert f(1) == 5"]),
        ("x = 3", ["assert x == 3"]),
    ] * 3
    results = run_many(jobs, timeout=5.0, workers=2)
    assert [r.status for r in results] == ["passed", "crashed", "failed", "passed"] * 3
    assert [r.total for r in results] == [1, 1, 2, 1] * 3
    assert run_many([]) == []


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
