"""Tests for the synthetic coding task and its parquet export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.sandbox import run_many, run_tests, strip_code_fence
from pipeline.stages import synthetic_data
from pipeline.tasks import synthetic
from pipeline.tasks.synthetic import (
    TEMPLATE_NAMES,
    Problem,
    coderl_rows,
    corpus_text,
    export_task,
    generate_problems,
    preference_rows,
    sft_rows,
)

N_TEMPLATES = len(TEMPLATE_NAMES)
EXPORT_PROBLEMS = 20
EXPORT_SEED = 3


def test_generate_problems_is_deterministic_and_distinct():
    a = generate_problems(40, seed=7)
    assert a == generate_problems(40, seed=7)
    assert a != generate_problems(40, seed=8)
    assert generate_problems(15, seed=7) == a[:15]  # smaller request is a prefix
    assert len({p.task_id for p in a}) == 40
    assert len({p.prompt for p in a}) == 40
    assert a[0].task_id == "synth/00000"


def test_problem_shape():
    problems = generate_problems(2 * N_TEMPLATES, seed=1)
    assert len(TEMPLATE_NAMES) >= 8
    # Templates are visited in shuffled rounds: each round of N_TEMPLATES covers all of them.
    assert {p.template for p in problems[:N_TEMPLATES]} == set(TEMPLATE_NAMES)
    for p in problems:
        assert p.prompt.startswith(f"Write a function {p.entry_point}(")
        first, body = p.solution.split("\n")
        assert first.startswith(f"def {p.entry_point}(") and first.endswith("):")
        assert body.startswith("    return ")
        # Every template has 3 wrong variants that differ from the reference on some input; the
        # generator drops indistinguishable ones, so fewer than 3 means a template is broken.
        assert len(p.wrong_solutions) == 3, p
        assert p.solution not in p.wrong_solutions
        assert len(set(p.wrong_solutions)) == len(p.wrong_solutions)
        assert all(w.startswith(first + "\n    return ") for w in p.wrong_solutions)
        assert 3 <= len(p.tests) <= 5
        assert all(t.startswith(f"assert {p.entry_point}(") and " == " in t for t in p.tests)


def test_references_pass_and_wrong_solutions_fail_in_sandbox():
    problems = generate_problems(2 * N_TEMPLATES, seed=11)
    assert {p.template for p in problems} == set(TEMPLATE_NAMES)
    jobs = [(p.solution, p.tests) for p in problems]
    jobs += [(w, p.tests) for p in problems for w in p.wrong_solutions]
    results = run_many(jobs)
    refs, wrongs = results[: len(problems)], results[len(problems) :]
    for p, res in zip(problems, refs, strict=True):
        assert res.status == "passed", (p.template, p.solution, p.tests, res.stderr)
    labels = [(p.template, w) for p in problems for w in p.wrong_solutions]
    for (template, code), res in zip(labels, wrongs, strict=True):
        assert res.status == "failed" and res.passed < res.total, (template, code)


def test_generate_problems_limits():
    assert generate_problems(0) == []
    with pytest.raises(ValueError):
        generate_problems(synthetic.MAX_PROBLEMS + 1)
    everything = generate_problems(synthetic.MAX_PROBLEMS, seed=2)
    assert len({p.prompt for p in everything}) == synthetic.MAX_PROBLEMS


def test_corpus_text():
    texts = corpus_text(30, seed=0)
    assert texts == corpus_text(30, seed=0)
    assert all(isinstance(t, str) and t for t in texts)
    joined = "\n".join(texts)
    assert "return" in joined and "assert" in joined and "```python" in joined
    assert len(texts) > 30 * 4


def test_sft_and_preference_rows():
    problems = generate_problems(5, seed=0)
    sft = sft_rows(problems)
    assert [r["task_id"] for r in sft] == [p.task_id for p in problems]
    assert sft[0]["messages"] == [
        {"role": "user", "content": problems[0].prompt},
        {"role": "assistant", "content": problems[0].solution},
    ]
    pairs = preference_rows(problems)
    assert len(pairs) == sum(len(p.wrong_solutions) for p in problems)
    by_id = {p.task_id: p for p in problems}
    for row in pairs:
        p = by_id[row["task_id"]]
        assert row["prompt"] == [{"role": "user", "content": p.prompt}]
        assert row["chosen"] == [{"role": "assistant", "content": p.solution}]
        assert row["rejected"][0]["role"] == "assistant"
        assert row["rejected"][0]["content"] in p.wrong_solutions


def test_other_constant_negatives():
    import re

    problems = generate_problems(26, seed=0)  # every template twice
    base = preference_rows(problems)
    rows = preference_rows(problems, constant_negatives=2, seed=3)
    assert rows == preference_rows(problems, constant_negatives=2, seed=3)  # seeded
    assert rows != preference_rows(problems, constant_negatives=2, seed=4)
    assert len(rows) == len(base) + 2 * len(problems) and all(r in rows for r in base)
    by_id = {p.task_id: p for p in problems}
    extra = [r for r in rows if r not in base]
    for row in extra:
        p = by_id[row["task_id"]]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen == p.solution and rejected != chosen and rejected not in p.wrong_solutions
        # the same code with another constant; the header keeps the problem's (def add_37(x):)
        assert rejected.split("\n")[0] == chosen.split("\n")[0]
        assert re.sub(r'\d+|"[a-z]"', "C", rejected) == re.sub(r'\d+|"[a-z]"', "C", chosen)
        constants = [re.findall(r'\d+|"[a-z]"', side.split("\n")[1]) for side in (chosen, rejected)]
        assert constants[0] != constants[1] and len(constants[0]) == len(constants[1]) >= 1
    # the other constant is wrong: executing it fails at least one input where the reference is right
    failures = run_many([(r["rejected"][0]["content"], by_id[r["task_id"]].tests) for r in extra])
    assert sum(res.fraction < 1 for res in failures) >= 0.9 * len(extra)


def test_coderl_rewards_come_from_execution():
    # The "reference" here is broken and the "wrong" one is right: rewards must follow execution.
    prob = Problem(
        task_id="t/0",
        prompt="Write a function inc(x) that returns x plus 1.",
        entry_point="inc",
        solution="def inc(x):\n    return x - 1",
        wrong_solutions=["def inc(x):\n    return x + 1", "def inc(x):\n    return 1"],
        tests=["assert inc(0) == 1", "assert inc(1) == 2", "assert inc(5) == 6"],
    )
    rows = coderl_rows([prob], responses_per_problem=8, seed=0, response_key="resp", reward_key="r")
    assert rows == coderl_rows([prob], responses_per_problem=8, seed=0, response_key="resp", reward_key="r")
    assert [r["uid"] for r in rows] == [f"t/0/r{j}" for j in range(8)]
    expected = {prob.solution: -1.0, prob.wrong_solutions[0]: 1.0, prob.wrong_solutions[1]: -1.0 / 3.0}
    for row in rows:
        assert row["resp"].startswith("```python\n") and row["resp"].endswith("\n```")
        assert row["r"] == pytest.approx(expected[strip_code_fence(row["resp"])])
        assert json.loads(row["prompt_pretokenized"]) == [{"role": "user", "content": prob.prompt}]
    assert {strip_code_fence(r["resp"]) for r in rows} >= {prob.solution}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    out = tmp_path_factory.mktemp("synthetic")
    paths = export_task(
        out, num_problems=EXPORT_PROBLEMS, seed=EXPORT_SEED, eval_fraction=0.2, responses_per_problem=4
    )
    return out, paths


def test_export_writes_all_files(exported):
    out, paths = exported
    names = {f"{kind}_{split}" for kind in ("sft", "pairs", "coderl") for split in ("train", "eval")}
    problems = {"problems_train", "problems_eval"}
    assert set(paths) == names | problems
    for name, path in paths.items():
        suffix = ".jsonl" if name in problems else ".parquet"
        assert Path(path) == out / f"{name}{suffix}" and Path(path).is_file()
    files = sorted([f"{n}.parquet" for n in names] + [f"{n}.jsonl" for n in problems])
    assert sorted(p.name for p in out.iterdir()) == files  # no temp files
    # the problems files are what eval-code and collect read: every reference solution passes
    from pipeline.stages.eval_code import load_problems

    held_out = load_problems(paths["problems_eval"])
    assert len(held_out) == len(pq.read_table(paths["sft_eval"])) and all(
        "tests" in p for p in held_out.values()
    )


def test_coderl_schema(exported):
    _, paths = exported
    for split in ("train", "eval"):
        table = pq.read_table(paths[f"coderl_{split}"])
        assert table.schema.names == [
            "uid",
            "prompt_pretokenized",
            "unprocessed_response",
            "normalized_reward",
            "task_id",
            "pass_fraction",
        ]
        assert table.schema.field("uid").type == pa.string()
        assert table.schema.field("prompt_pretokenized").type == pa.string()
        assert table.schema.field("unprocessed_response").type == pa.string()
        assert table.schema.field("normalized_reward").type == pa.float64()
        rows = table.to_pylist()
        assert len({r["uid"] for r in rows}) == len(rows)
        for r in rows:
            messages = json.loads(r["prompt_pretokenized"])
            assert isinstance(messages, list) and len(messages) == 1
            assert set(messages[0]) == {"role", "content"} and messages[0]["role"] == "user"
            assert -1.0 <= r["normalized_reward"] <= 1.0
            assert r["normalized_reward"] == pytest.approx(2 * r["pass_fraction"] - 1)


def test_coderl_rewards_reproduce_by_re_execution(exported):
    _, paths = exported
    problems = {p.task_id: p for p in generate_problems(EXPORT_PROBLEMS, seed=EXPORT_SEED)}
    rows = pq.read_table(paths["coderl_train"]).to_pylist() + pq.read_table(paths["coderl_eval"]).to_pylist()
    assert len(rows) == EXPORT_PROBLEMS * 4
    results = run_many(
        [(strip_code_fence(r["unprocessed_response"]), problems[r["task_id"]].tests) for r in rows]
    )
    for row, res in zip(rows, results, strict=True):
        assert math.isclose(2 * res.fraction - 1, row["normalized_reward"]), row
    rewards = [r["normalized_reward"] for r in rows]
    assert any(x > 0 for x in rewards) and any(x < 0 for x in rewards)
    # Spot-check one row with a single call, independently of run_many.
    row = rows[0]
    single = run_tests(strip_code_fence(row["unprocessed_response"]), problems[row["task_id"]].tests)
    assert single.fraction == row["pass_fraction"]


def test_splits_are_disjoint(exported):
    _, paths = exported
    for kind in ("sft", "pairs", "coderl"):
        train = set(pq.read_table(paths[f"{kind}_train"], columns=["task_id"]).column("task_id").to_pylist())
        held = set(pq.read_table(paths[f"{kind}_eval"], columns=["task_id"]).column("task_id").to_pylist())
        assert train and held and not train & held
        assert len(train | held) == EXPORT_PROBLEMS
        assert len(held) == 4  # eval_fraction=0.2 of 20


def test_parquet_loads_with_datasets(exported, tmp_path):
    datasets = pytest.importorskip("datasets")
    _, paths = exported
    sft = datasets.load_dataset("parquet", data_files={"train": paths["sft_train"]}, cache_dir=str(tmp_path))[
        "train"
    ]
    assert len(sft) == EXPORT_PROBLEMS - 4
    messages = sft[0]["messages"]
    assert isinstance(messages, list) and isinstance(messages[0], dict)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"].startswith("def ")
    pairs = datasets.load_dataset(
        "parquet", data_files={"train": paths["pairs_train"]}, cache_dir=str(tmp_path)
    )["train"]
    assert set(pairs.column_names) == {"prompt", "chosen", "rejected", "task_id"}
    assert pairs[0]["chosen"][0]["role"] == "assistant"


def test_cli(tmp_path, capsys):
    assert (
        synthetic_data.main(
            ["--output_dir", str(tmp_path), "--num_problems", "6", "--responses_per_problem", "1"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for name in ("sft_train", "pairs_eval", "coderl_train"):
        assert str(tmp_path / f"{name}.parquet") in printed
    assert (
        pq.read_table(tmp_path / "coderl_train.parquet").num_rows
        + pq.read_table(tmp_path / "coderl_eval.parquet").num_rows
        == 6
    )
    with pytest.raises(SystemExit) as exc:
        synthetic_data.main(["--help"])
    assert exc.value.code == 0
    assert "synthetic-data" in capsys.readouterr().out
    # other-constant pairs go to pairs_train only; the eval pairs stay the task's own
    more = tmp_path / "more"
    synthetic_data.main(["--output_dir", str(more), "--num_problems", "10", "--responses_per_problem", "1",
                    "--eval_fraction", "0.2", "--constant_negatives", "2", "--seed", "1"])  # fmt: skip
    train, held = synthetic.split_problems(generate_problems(10, seed=1), 0.2, seed=1)
    assert pq.read_table(more / "pairs_train.parquet").to_pylist() == preference_rows(train, 2, seed=1)
    assert pq.read_table(more / "pairs_eval.parquet").to_pylist() == preference_rows(held)
    with pytest.raises(PipelineError, match="constant_negatives must be >= 0, got -1"):
        synthetic_data.main(["--output_dir", str(more), "--constant_negatives", "-1"])
