"""Problem formats the sandbox judges: MBPP and stdin/stdout records (written here in those datasets' shapes),
HumanEval's helpers in the checker, arguments changed in place, detection and its one-line error."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import PipelineError
from pipeline.sandbox import run_many
from pipeline.sandbox.problems import check_for, detect_format, program_for, reference_solution

MBPP = [
    {"task_id": 1, "text": "Write a function to find the area of a circle.",
     "code": "import math\ndef circle_area(r):\n    return math.pi * r * r\n",
     "test_list": ["assert math.isclose(circle_area(1), 3.141592653589793)", "assert circle_area(0) == 0"],
     "test_setup_code": ""},
    {"task_id": 2, "text": "Write a function to remove the first and last occurrence of a character.",
     "code": "def remove_occ(s, ch):\n    s = s.replace(ch, '', 1)\n    i = s.rfind(ch)\n"
             "    return s if i < 0 else s[:i] + s[i + 1:]\n",
     "test_list": ["assert remove_occ('hello', 'l') == 'heo'", "assert remove_occ('abcda', 'a') == 'bcd'",
                   "assert remove_occ('PHP', 'P') == 'H'"],
     "test_setup_code": ""},
    {"task_id": 3, "text": "Write a function to sort a list in place and return its length.",
     "code": "def sort_len(xs):\n    xs.sort()\n    return len(xs)\n",
     "test_list": ["data = [3, 1, 2]\nassert sort_len(data) == 3 and data == [1, 2, 3]"],
     "test_setup_code": ""},
    {"task_id": 4, "text": "Write a function that counts the words of a sentence longer than LIMIT.",
     "code": "def long_words(s, limit):\n    return sum(len(w) > limit for w in s.split())\n",
     "test_list": ["assert long_words(SENTENCE, LIMIT) == 2", "assert long_words('a bb ccc', 1) == 2"],
     "test_setup_code": "SENTENCE = 'the quick brown fox'\nLIMIT = 3"},
]  # fmt: skip
MBPP_WRONG = {
    1: "def circle_area(r):\n    return 3.14 * r * r\n",
    2: "def remove_occ(s, ch):\n    return s.replace(ch, '', 1)\n",  # the first occurrence only
    3: "def sort_len(xs):\n    return len(sorted(xs))\n",  # right length, list not sorted in place
    4: "def long_words(s, limit):\n    return len(s.split())\n",
}
STDIO = [
    {"task_id": "sum", "inputs": ["1 2\n", "10 -3\n", "0 0\n"], "outputs": ["3\n", "7\n", "0\n"],
     "solution": "a, b = map(int, input().split())\nprint(a + b)\n"},
    {"task_id": "apps/lines", "input_output": json.dumps({"inputs": ["3\nc\nb\na\n", "1\nx\n"],
                                                          "outputs": ["a b c", "x"]}),
     "solutions": json.dumps(["import sys\nn, *rest = sys.stdin.read().split()\nprint(*sorted(rest[:int(n)]))\n"])},
    {"task_id": "exit", "inputs": ["5\n"], "outputs": ["25\n"],
     "solution": "import sys\nn = int(sys.stdin.readline())\nprint(n * n)\nsys.exit()\n"},
]  # fmt: skip


def _judge(records, completions):
    return run_many([(program_for(r, c), check_for(r)) for r, c in zip(records, completions, strict=True)])


def test_mbpp_canonical_solutions_pass_and_wrong_ones_fail():
    assert {detect_format(r) for r in MBPP} == {"mbpp"}
    good = _judge(MBPP, [reference_solution(r) for r in MBPP])
    assert [r.status for r in good] == ["passed"] * len(MBPP), [r.error for r in good]
    bad = _judge(MBPP, [MBPP_WRONG[r["task_id"]] for r in MBPP])
    assert [r.status for r in bad] == ["failed"] * len(MBPP)
    assert [r.passed for r in bad] == [1, 0, 0, 0]  # each test counted on its own
    assert bad[1].error == "test 0: AssertionError at line 1: assert remove_occ('hello', 'l') == 'heo'"
    assert bad[2].error.startswith("test 0: AssertionError at line 2")  # the in-place sort is checked


def test_stdio_canonical_solutions_pass_and_a_wrong_output_names_its_input():
    assert {detect_format(r) for r in STDIO} == {"stdio"}
    good = _judge(STDIO, [reference_solution(r) for r in STDIO])
    assert [r.status for r in good] == ["passed"] * len(STDIO), [r.error for r in good]
    assert [r.total for r in good] == [3, 2, 1]
    wrong = _judge(
        STDIO[:1] * 2, ["a, b = map(int, input().split())\nprint(a - b)\n", "raise ValueError('no')\n"]
    )
    assert (wrong[0].status, wrong[0].passed) == ("failed", 1)  # 0 0 -> 0 is right by accident
    assert wrong[0].error == "test 0: input '1 2\\n' gave '-1\\n', expected '3\\n'"
    assert wrong[1].error == "test 0: input '1 2\\n': the program exited with status 1"
    assert "ValueError: no" in wrong[1].stderr


def test_humaneval_helpers_come_from_the_trusted_prompt():
    # HumanEval/38's shape: the test calls a helper the prompt defines; the candidate's copy is not used
    prompt = 'def encode(s):\n    return s[::-1]\n\n\ndef decode(s):\n    """Undo encode."""\n'
    record = {"task_id": "t", "prompt": prompt, "entry_point": "decode",
              "test": "def check(candidate):\n    assert candidate(encode('abc')) == 'abc'\n"}  # fmt: skip
    honest = "    return s[::-1]\n"
    cheat = "    return s[::-1]\nencode = lambda s: s\ndef decode(s):\n    return 'abc'\n"
    ok, forged = _judge([record, record], [honest, cheat])
    assert ok.status == "passed" and forged.status == "passed"  # 'abc' is the right answer here either way
    other = {**record, "test": record["test"].replace("'abc'", "'xyz'")}
    assert (
        _judge([other], [cheat])[0].status == "failed"
    )  # the candidate's `encode` does not replace the prompt's


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"task_id": 1, "prompt": "p", "test": "t"},
         r"fields \['prompt', 'task_id', 'test'\] match no problem format; accepted: HumanEval \(prompt, test, entry_point\); MBPP"),
        ({"task_id": 1, "test_list": "assert f(1)"}, r"'test_list' must be a list, got str"),
        ({"task_id": 1, "inputs": ["1"], "outputs": []}, r"1 inputs and 0 outputs"),
        ({"task_id": 1, "input_output": "{oops"}, r"'input_output' is not valid JSON"),
    ],
)  # fmt: skip
def test_records_in_no_format_are_one_line_errors(record, message):
    with pytest.raises(PipelineError, match=message):
        check_for(record, "problems.jsonl:3")


def test_eval_code_judges_an_mbpp_file(tmp_path, capsys):
    from pipeline.stages import eval_code

    problems, samples = tmp_path / "mbpp.jsonl", tmp_path / "samples.jsonl"
    problems.write_text("".join(json.dumps({**r, "task_id": str(r["task_id"])}) + "\n" for r in MBPP))
    rows = [{"task_id": str(r["task_id"]), "completion": reference_solution(r)} for r in MBPP]
    rows += [{"task_id": str(r["task_id"]), "completion": MBPP_WRONG[r["task_id"]]} for r in MBPP]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = eval_code.main(["--samples", str(samples), "--problems", str(problems), "--k", "1"])
    assert summary["num_passed"] == len(MBPP) and summary["pass@1"] == pytest.approx(0.5)
