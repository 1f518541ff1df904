"""The task as training rows: SFT chats, preference pairs, reward-keyed code-RL rows (rewards from running
the task's own template-built programs against its tests), and the texts a tokenizer is trained on."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

from pipeline.rewards import reward_from_fraction
from pipeline.tasks.synthetic.problems import _TEMPLATES_BY_NAME, Problem, _code, generate_problems

_EXTRA_TEXT = (
    "Write a function that returns the answer.",
    "The function takes one argument and returns a value.",
    "def return assert True False None if else for in while and or not import from class lambda",
    "plus minus times divided by the sum of the list the string the letter characters",
    "larger smaller absolute difference between upper case lower case reversed repeated divisible",
    "print(len(s))\nprint(sum(xs))\nprint(max(a, b))\nprint(min(a, b))\nprint(abs(x - y))",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 99 100",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "Here is the code:\n```python\ndef f(x):\n    return x\n```",
    "user assistant system",
)


def _fence(code: str) -> str:
    return f"```python\n{code}\n```"


def corpus_text(num_problems: int = 400, seed: int = 0) -> list[str]:
    """Deterministic texts (prompts, code, tests, a few plain words) to train a tokenizer on."""
    texts = list(_EXTRA_TEXT)
    for prob in generate_problems(num_problems, seed):
        texts.append(prob.prompt)
        texts.append(prob.solution)
        texts.append(_fence(prob.solution))
        texts.extend(prob.wrong_solutions)
        texts.append("\n".join(prob.tests))
    return texts


def _user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _assistant(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


def sft_rows(problems: Sequence[Problem]) -> list[dict[str, Any]]:
    """Chat SFT rows: user prompt, assistant reference solution (unfenced)."""
    return [{"messages": _user(p.prompt) + _assistant(p.solution), "task_id": p.task_id} for p in problems]


def other_constant_solutions(problem: Problem, count: int, rng: random.Random) -> list[str]:
    """`count` wrong solutions that are the reference with another of its template's constants in the body
    (`return x + 52` under `def add_37(x):`); the function name keeps the problem's constant."""
    tpl, p = _TEMPLATES_BY_NAME[problem.template], problem.param
    candidates = [_code(tpl, p, tpl.fill(tpl.body, q)) for q in tpl.params if q != p]
    candidates = [c for c in candidates if c not in problem.wrong_solutions]  # new wrong solutions only
    return rng.sample(candidates, min(count, len(candidates)))


def preference_rows(
    problems: Sequence[Problem], constant_negatives: int = 0, seed: int = 0
) -> list[dict[str, Any]]:
    """TRL conversational preference rows: one per wrong solution (reference chosen, wrong rejected), plus
    `constant_negatives` per problem whose rejected side has another constant (`other_constant_solutions`).

    Those extra pairs are hard negatives for reward models: a third of the task's own wrong solutions differ
    from the reference only in a constant off by one, and ranking them means checking the body's constant
    against the prompt's. Seeded per problem, so a problem's pairs do not depend on the others."""
    rows = []
    for p in problems:
        wrong = list(p.wrong_solutions)
        if constant_negatives:
            rng = random.Random(f"constants:{seed}:{p.task_id}")
            wrong += other_constant_solutions(p, constant_negatives, rng)
        for w in wrong:
            rows.append(
                {
                    "prompt": _user(p.prompt),
                    "chosen": _assistant(p.solution),
                    "rejected": _assistant(w),
                    "task_id": p.task_id,
                }
            )
    return rows


def template_pass_fraction(code: str, tests: Sequence[str]) -> float:
    """Share of ``tests`` (assert statements) that ``code`` passes, each assert run on its own as the sandbox
    does. Runs in this process, so only for the task's own programs, built from the templates: a reference
    or a listed wrong solution, never model output (that goes through `pipeline.sandbox`).
    Compiled with ``optimize=0``: under ``python -O`` an assert would otherwise vanish and every wrong
    solution pass. tests/test_rewards.py checks it against the sandbox on every solution of every template."""
    namespace: dict[str, Any] = {}
    try:
        exec(compile(code, "<synthetic solution>", "exec", optimize=0), namespace)
    except Exception:
        return 0.0
    passed = 0
    for test in tests:
        try:
            exec(compile(test, "<synthetic test>", "exec", optimize=0), dict(namespace))
        except Exception:  # a failed assert, or a wrong solution that raises
            continue
        passed += 1
    return passed / len(tests) if tests else 0.0


def coderl_rows(
    problems: Sequence[Problem],
    responses_per_problem: int = 4,
    seed: int = 0,
    response_key: str = "unprocessed_response",
    reward_key: str = "normalized_reward",
) -> list[dict[str, Any]]:
    """Offline code-RL rows: fenced responses (a seeded mix of reference and wrong solutions) with
    rewards ``2 * pass_fraction - 1`` from running them against the problem's tests
    (`template_pass_fraction`: the sandbox's count, without a sandbox per row). Runs the problems' code in
    this process: only for trusted, template-built `Problem`s (`generate_problems`), never model output."""
    if responses_per_problem < 1:
        raise ValueError("responses_per_problem must be >= 1")
    rows = []
    for prob in problems:
        # Per-problem RNG: a problem's responses do not depend on which other problems are in the list.
        rng = random.Random(f"coderl:{seed}:{prob.task_id}")
        fractions: dict[str, float] = {}
        for j in range(responses_per_problem):
            code = prob.solution if rng.random() < 0.5 else rng.choice(prob.wrong_solutions)
            if code not in fractions:
                fractions[code] = template_pass_fraction(code, prob.tests)
            frac = fractions[code]
            rows.append(
                {
                    "uid": f"{prob.task_id}/r{j}",
                    "prompt_pretokenized": json.dumps(_user(prob.prompt)),
                    response_key: _fence(code),
                    reward_key: reward_from_fraction(frac),
                    "task_id": prob.task_id,
                    "pass_fraction": frac,
                }
            )
    return rows
