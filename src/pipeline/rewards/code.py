"""Code-execution rewards built on :mod:`pipeline.sandbox`, in the form TRL's ``GRPOTrainer`` calls them.

GRPOTrainer (trl 1.16) calls each reward function as
``f(prompts=[...], completions=[...], completion_ids=[...], **columns)``. ``columns`` holds every other
dataset column as a list with one value per completion, plus ``trainer_state``, ``log_extra`` and
``log_metric``. The function returns one float per completion, or None where it does not apply.
Completions are strings (standard format) or message lists (conversational:
``[{"role": "assistant", "content": ...}]``).

- :func:`code_execution_reward`: dataset column ``tests`` (a list of assert statements per row). The
  reward is ``2 * pass_fraction - 1`` (:func:`reward_from_fraction`), the same mapping as the synthetic
  task's ``normalized_reward``.
- :func:`humaneval_reward`: columns ``test`` and ``entry_point`` (and ``code_prompt`` for chat prompts).
  The reward is 1.0 if HumanEval's ``check(entry_point)`` passes, else 0.0.

Every verdict is the sandbox checker's: the completion runs in its own process and answers calls with
plain data, so it cannot forge a pass (:mod:`pipeline.sandbox`).

Pass options with ``functools.partial`` (TRL names the function after the wrapped one):
``partial(code_execution_reward, timeout=2.0, workers=8)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.sandbox import HumanEvalTest, Limits, run_many, strip_code_fence

__all__ = [
    "code_execution_reward",
    "completion_text",
    "humaneval_reward",
    "reward_from_fraction",
]


def reward_from_fraction(fraction: float) -> float:
    """Map a test pass fraction in [0, 1] to a reward in [-1, 1]: all fail -1, all pass +1."""
    return 2.0 * fraction - 1.0


def completion_text(completion: Any) -> str:
    """The text of one completion: a string as is, or the last assistant message of a conversational one
    (its content a string or a list of ``{"type": "text", "text": ...}`` parts)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, Sequence):
        raise TypeError(f"completion must be a string or a list of messages, got {type(completion).__name__}")
    messages = [m for m in completion if isinstance(m, dict)]
    assistant = [m for m in messages if m.get("role", "assistant") == "assistant"] or messages
    if not assistant:
        return ""
    content = assistant[-1].get("content") or ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def code_execution_reward(
    completions: list[Any],
    tests: list[Sequence[str] | None],
    *,
    timeout: float = 5.0,
    workers: int | None = None,
    limits: Limits | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """``2 * pass_fraction - 1`` of each completion (one code fence stripped) against its row's ``tests``.

    A row whose ``tests`` is None or empty gets None (not applicable), as TRL allows. A program that does
    not exec, times out or crashes passes no test: -1.0.
    """
    if len(tests) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(tests)} rows of tests")
    rewards: list[float | None] = [None] * len(completions)
    todo = [i for i, t in enumerate(tests) if t]
    jobs = [(strip_code_fence(completion_text(completions[i])), list(tests[i])) for i in todo]
    for i, res in zip(todo, run_many(jobs, timeout=timeout, workers=workers, limits=limits), strict=True):
        rewards[i] = reward_from_fraction(res.fraction)
    return rewards


def humaneval_reward(
    prompts: list[Any],
    completions: list[Any],
    test: list[str | None],
    entry_point: list[str | None],
    code_prompt: list[str | None] | None = None,
    *,
    timeout: float = 5.0,
    workers: int | None = None,
    limits: Limits | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 if the completion passes HumanEval's ``check(entry_point)``, else 0.0 (None where ``test`` is None).

    The code in front of the completion is the row's ``code_prompt`` where the dataset has that column.
    Otherwise it is the prompt itself when the prompt is a string (HumanEval's completion format:
    ``prompt + completion``). A conversational prompt without ``code_prompt`` leaves the completion to
    stand alone. For chat completions (one fence stripped), a newline separates the code prompt from the
    completion, so a complete function redefines the prompt's stub and keeps its imports.
    """
    n = len(completions)
    if not (len(prompts) == len(test) == len(entry_point) == n):
        raise ValueError("prompts, completions, test and entry_point must have one value per completion")
    rewards: list[float | None] = [None] * n
    jobs, todo = [], []
    for i in range(n):
        if test[i] is None or entry_point[i] is None:
            continue
        prefix = code_prompt[i] if code_prompt is not None and code_prompt[i] is not None else None
        if isinstance(completions[i], str):
            body = completions[i]
            if prefix is None and isinstance(prompts[i], str):
                prefix = prompts[i]
        else:
            body = "\n" + strip_code_fence(completion_text(completions[i]))
        jobs.append(((prefix or "") + body, HumanEvalTest(test[i], entry_point[i], prefix or "")))
        todo.append(i)
    for i, res in zip(todo, run_many(jobs, timeout=timeout, workers=workers, limits=limits), strict=True):
        rewards[i] = 1.0 if res.status == "passed" else 0.0
    return rewards
