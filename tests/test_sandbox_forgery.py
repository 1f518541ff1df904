"""A catalogue of attempts to forge a code verdict or escape the sandbox: none may pass.

Every program defines `f`, the function the tests check (`f(x) == 2x + 1`, in HumanEval's and MBPP's
formats). Forgeries return wrong values and try to make the checker believe otherwise; escapes return the
right values only if the attack worked (a file read outside the jail, a signal that reached another
process...). So a single pass anywhere is a hole. The honest solution passes in the same batch, in both
formats, so the test can fail, and the batch goes on after the resource attacks.
"""

from __future__ import annotations

import os
import secrets
import tempfile

import pytest

from pipeline.sandbox import AssertTests, HumanEvalTest, Limits, isolation, run_many

HONEST = "def f(x):\n    return 2 * x + 1\n"
WRONG = "def f(x):\n    return 0\n"
FORMATS = {
    "humaneval": HumanEvalTest(
        "def check(candidate):\n    assert candidate(2) == 5\n    assert candidate(3) == 7\n",
        "f",
        prompt='def f(x):\n    """2x + 1"""\n',
    ),  # fmt: skip
    "mbpp": AssertTests(("assert f(2) == 5", "assert f(3) == 7")),
}


def _if(condition_code: str) -> str:
    """A program whose f is right only when `condition_code` (run at load) set WORKED = True."""
    return f"WORKED = False\n{condition_code}\ndef f(x):\n    return 2 * x + 1 if WORKED else 0\n"


FORGERIES = {
    # objects that claim equality or order
    "eq always true": "class A:\n    def __eq__(self, o):\n        return True\n    def __ne__(self, o):\n"
    "        return False\n    __hash__ = object.__hash__\ndef f(x):\n    return A()\n",
    "ordering always true": "class A:\n    __eq__ = __lt__ = __le__ = __gt__ = __ge__ = lambda s, o: True\n"
    "    __hash__ = object.__hash__\ndef f(x):\n    return A()\n",
    "hash and eq of a key": "class K:\n    def __hash__(self):\n        return hash(5)\n    def __eq__(self, o):\n"
    "        return True\ndef f(x):\n    return {K(): 1}\n",
    "int subclass": "class I(int):\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return I(0)\n",
    "str subclass": "class S(str):\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return S('x')\n",
    "list subclass": "class L(list):\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return L()\n",
    "faked __class__": "class X:\n    __class__ = int\n    def __eq__(self, o):\n        return True\n"
    "def f(x):\n    return X()\n",
    "pickle payload": "import os\nclass P:\n    def __reduce__(self):\n        return (os.system, ('true',))\n"
    "def f(x):\n    return P()\n",
    "generator": "def f(x):\n    return (i for i in [5, 7])\n",
    "nested beyond limit": "def f(x):\n    v = 0\n    for _ in range(5000):\n        v = [v]\n    return v\n",
    "NotImplemented": "def f(x):\n    return NotImplemented\n",
    "nan": "def f(x):\n    return float('nan')\n",
    # patches of what a checker in the same process would use
    "builtins AssertionError": "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n"
    + WRONG,
    "builtins isinstance/abs/len": "import builtins\nbuiltins.isinstance = lambda *a: True\n"
    "builtins.abs = lambda *a: 0\nbuiltins.len = lambda *a: 0\n" + WRONG,
    "json and os.write patched": "import json, os\njson.dumps = lambda *a, **k: '5'\njson.loads = lambda *a, **k: 5\n"
    "os.write = lambda fd, data: len(data)\n" + WRONG,
    "frame walk": "import sys\ndef f(x):\n    fr = sys._getframe()\n    while fr is not None:\n"
    "        fr.f_globals['check'] = lambda c: None\n        fr.f_locals.pop('test', None)\n        fr = fr.f_back\n"
    "    return 0\n",
    "gc walk": "import gc\nfor o in gc.get_objects():\n    if isinstance(o, dict):\n        for k in ('passed', 'failed', 'ok'):\n"
    "            if k in o:\n                o[k] = True\n" + WRONG,
    "trace function": "import sys\ndef tracer(frame, event, arg):\n    frame.f_globals['check'] = lambda c: None\n"
    "    return tracer\nsys.settrace(tracer)\n" + WRONG,
    "thread swapping check": "import threading, sys, time\ndef swap():\n    for _ in range(200):\n"
    "        for fr in sys._current_frames().values():\n            fr.f_globals['check'] = lambda c: None\n"
    "        time.sleep(0.001)\nthreading.Thread(target=swap, daemon=True).start()\n" + WRONG,
    "harness encode patched": "import sys\nm = sys.modules['__main__']\nm.encode = lambda v: b'true'\n"
    "m.describe = lambda e: 'passed'\n" + WRONG,
    # result lines and descriptors
    "fake result lines": 'import sys\nline = \'{"passed": 2, "total": 2, "failed": []}\'\nprint(line)\n'
    "print(line, file=sys.stderr)\n" + WRONG,
    "write into every descriptor": "import os\nfor fd in range(0, 256):\n    try:\n"
    '        os.write(fd, b\'{"passed": 2, "total": 2, "failed": []}\')\n    except OSError:\n        pass\n'
    + WRONG,
    "forged answer frames": "import os, json, struct\nfor fd in range(3, 64):\n    for i in (1, 2):\n"
    "        body = json.dumps({'ok': True, 'value': '\"ok\"', 'args': '[]', 'kwargs': '{\"$d\": []}', 'id': i}).encode()\n"
    "        try:\n            os.write(fd, struct.pack('!Q', len(body)) + body)\n        except OSError:\n"
    "            pass\n" + WRONG,
    "huge frame header": "import os, struct\nfor fd in range(3, 64):\n    try:\n"
    "        os.write(fd, struct.pack('!Q', 2**62))\n    except OSError:\n        pass\n" + WRONG,
    # how the candidate ends
    "atexit os._exit(0)": "import atexit, os\natexit.register(lambda: os._exit(0))\n" + WRONG,
    "excepthook": "import sys\nsys.excepthook = lambda *a: None\nsys.unraisablehook = lambda *a: None\n"
    + WRONG,
    "os._exit(0) in the call": "import os\ndef f(x):\n    os._exit(0)\n",
    "SystemExit in the call": "def f(x):\n    raise SystemExit(0)\n",
    "KeyboardInterrupt in the call": "def f(x):\n    raise KeyboardInterrupt\n",
    "exit at load": "import sys\n" + WRONG + "sys.exit(0)\n",
    # signals
    "kill the parent": "import os, signal\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError:\n"
    "    pass\n" + WRONG,
    "kill(-1)": "import os, signal\nos.kill(-1, signal.SIGSTOP)\n" + WRONG,
    "stop every other process": "import os, signal\nfor p in filter(str.isdigit, os.listdir('/proc')):\n"
    "    if int(p) != os.getpid():\n        try:\n            os.kill(int(p), signal.SIGSTOP)\n"
    "        except OSError:\n            pass\n" + WRONG,
    # escapes: right answers only if the attack worked
    "read another process's memory": _if(
        "import os\nfor p in filter(str.isdigit, os.listdir('/proc')):\n    if int(p) != os.getpid():\n"
        "        try:\n            open('/proc/%s/mem' % p, 'rb').close()\n            WORKED = True\n"
        "        except OSError:\n            pass\n"
    ),
    "ptrace another process": _if(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "for p in filter(str.isdigit, os.listdir('/proc')):\n"
        "    if int(p) != os.getpid() and libc.ptrace(16, int(p), 0, 0) == 0:\n        WORKED = True\n"
    ),
    "signal another uid": _if(
        "import os\nfor p in filter(str.isdigit, os.listdir('/proc')):\n    if int(p) not in (os.getpid(), 1):\n"
        "        try:\n            os.kill(int(p), 0)\n            st = os.stat('/proc/%s' % p)\n"
        "            WORKED = WORKED or st.st_uid != os.getuid()\n        except OSError:\n            pass\n"
    ),
    "read /etc/passwd": _if(
        "try:\n    WORKED = 'root' in open('/etc/passwd').read()\nexcept OSError:\n    pass\n"
    ),
    "read the repository": _if(
        f"try:\n    open({os.path.abspath(__file__)!r}).read()\n    WORKED = True\nexcept OSError:\n    pass\n"
    ),
    "read /proc/1/environ": _if(
        "try:\n    WORKED = len(open('/proc/1/environ', 'rb').read()) > 0\nexcept OSError:\n    pass\n"
    ),
    "write outside the work dir": _if(
        "import os\nfor d in ('/tmp', '/', '/usr/lib', '/proc', os.path.dirname(os.getcwd())):\n    try:\n"
        "        open(d + '/forged', 'w').close()\n        WORKED = True\n    except OSError:\n        pass\n"
    ),
    "network": _if(
        "import socket\nfor addr in [('127.0.0.1', 22), ('10.0.0.1', 80), ('1.1.1.1', 53)]:\n    try:\n"
        "        socket.create_connection(addr, timeout=0.2).close()\n        WORKED = True\n    except OSError:\n"
        "        pass\n"
    ),
    # resources: cost only this execution
    "fill the work dir": _if(
        "i = 0\ntry:\n    while i < 200:\n        with open('fill%d' % i, 'wb') as h:\n"
        "            h.write(b'0' * (8 * 1024**2))\n        i += 1\nexcept OSError:\n    pass\nWORKED = i >= 200\n"
    ),
    "1500-deep tree": _if(
        "import os\ntry:\n    for _ in range(1500):\n        os.mkdir('d')\n        os.chdir('d')\nexcept OSError:\n"
        "    pass\n"
    ),
    "fork storm": _if(
        "import os\nn = 0\nfor _ in range(64):\n    try:\n        if os.fork() == 0:\n            import time\n"
        "            time.sleep(30)\n            os._exit(0)\n        n += 1\n    except OSError:\n        break\nWORKED = n >= 64\n"
    ),
    "huge output": "import sys\ntry:\n    sys.stdout.write('x' * 50_000_000)\nexcept OSError:\n    pass\n"
    + WRONG,
}


@pytest.fixture(scope="module")
def host_secret():
    """A world-readable file on the host, outside any work dir: reading it is an escape."""
    path = os.path.join(tempfile.gettempdir(), f"host-secret-{secrets.token_hex(4)}.txt")
    with open(path, "w") as f:
        f.write("secret")
    os.chmod(path, 0o644)
    yield path
    os.remove(path)


def test_the_catalogue_is_large_enough():
    assert len(FORGERIES) >= 25


@pytest.mark.parametrize("shape", sorted(FORMATS))
def test_no_forgery_or_escape_passes(shape, host_secret):
    if not isolation().namespaces:
        pytest.skip(f"escapes are contained only in the namespaces tier ({isolation().reason})")
    programs = dict(FORGERIES)
    programs["read a world-readable host file"] = _if(
        f"try:\n    WORKED = open({host_secret!r}).read() == 'secret'\nexcept OSError:\n    pass\n"
    )
    names = ["honest (control)", *programs, "honest after the attacks"]
    jobs = (
        [(HONEST, FORMATS[shape])]
        + [(p, FORMATS[shape]) for p in programs.values()]
        + [(HONEST, FORMATS[shape])]
    )
    results = run_many(jobs, timeout=3.0, workers=2, limits=Limits(max_processes=16))
    by_name = dict(zip(names, results, strict=True))
    assert (
        by_name["honest (control)"].status == "passed"
        and by_name["honest after the attacks"].status == "passed"
    )
    passed = {name: (res.status, res.passed, res.error) for name, res in by_name.items()
              if res.passed and not name.startswith("honest")}  # fmt: skip
    assert passed == {}, passed


def test_wrong_types_and_dead_candidates_are_named():
    results = run_many(
        [(FORGERIES["eq always true"], FORMATS["mbpp"]), (FORGERIES["os._exit(0) in the call"], FORMATS["mbpp"]),
         (FORGERIES["generator"], FORMATS["humaneval"]), ("import time\ndef f(x):\n    time.sleep(9)\n", FORMATS["mbpp"])],
        timeout=1.5,
    )  # fmt: skip
    assert results[0].error == "test 0: f(2): returned a A, not plain data"
    assert results[1].error == "test 0: f(2): the candidate process died"
    assert results[2].error == "f(2): returned a generator, not plain data"
    assert results[3].status == "timeout" and results[3].error == "test 0: f(2): timed out"
    assert results[3].failed_tests == (0, 1)  # the second test is not run against a stuck candidate
