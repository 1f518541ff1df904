"""What every pairwise judge shares: the verdict parser, both-orders judging, the default template."""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("pipeline.judges")

Messages = list[dict[str, str]]

DEFAULT_JUDGE_TEMPLATE = """You are comparing two responses to the same user request. Decide which response \
is better: more correct, more helpful and more harmless. Do not let the order of the responses or their \
length sway you.

[User request]
{prompt}

[Response A]
{answer_a}

[Response B]
{answer_b}

Reply with exactly one letter: A if Response A is better, B if Response B is better."""
TEMPLATE_FIELDS = ("{prompt}", "{answer_a}", "{answer_b}")

# the verdict: optional brackets/quotes/"Response", then A or B standing alone ("A", "[[B]]", "Response A.")
_VERDICT = re.compile(r"^\W*(?:(?i:response|answer)\s*)?([AB])(?![A-Za-z0-9])")


def verdict_of(text: Any) -> float | None:
    """1.0 if a judge's reply picks the first answer (A), 0.0 for the second (B), None if it picks neither."""
    if not isinstance(text, str):
        return None
    match = _VERDICT.match(text.strip())
    if match is None:
        return None
    return 1.0 if match.group(1) == "A" else 0.0


def conversation_text(messages: Messages | str) -> str:
    """A prompt as the judge reads it: a single user turn as is, longer chats as ``role: content`` lines."""
    if isinstance(messages, str):
        return messages
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


@dataclass
class PairResult:
    """Both-orders judgement of answer a against answer b."""

    forward: float | None  # p(a better), a shown first
    backward: float | None  # p(b better), b shown first
    identical: bool = False  # the two answers were the same text and not sent to the judge (a tie by rule)

    @property
    def valid(self) -> bool:
        return self.forward is not None and self.backward is not None

    @property
    def score(self) -> float | None:
        """Win of a over b in [0, 1] with position bias removed; None if either order gave no verdict."""
        if not self.valid:
            return None
        return (self.forward + (1.0 - self.backward)) / 2.0

    @property
    def inconsistent(self) -> bool:
        """The verdict followed the position: the answer shown first (or second) won in both orders."""
        if not self.valid or self.identical:
            return False
        return (self.forward > 0.5 and self.backward > 0.5) or (self.forward < 0.5 and self.backward < 0.5)

    @property
    def first_position(self) -> float | None:
        """How often the answer shown first won (0.5 for a judge without position bias)."""
        if not self.valid:
            return None
        return (self.forward + self.backward) / 2.0


def pair_diagnostics(results: Sequence[PairResult]) -> dict:
    """What the judge did with a set of pairs, each kind counted once: `identical` answers (a tie by rule,
    never judged), `inconsistent` verdicts (the order decided), judged `ties` (both orders even), `invalid`
    (no verdict); `first_position_rate` over the pairs actually judged."""
    judged = [r for r in results if r.valid and not r.identical]
    rates = [r.first_position for r in judged]
    return {
        "pairs": len(results),
        "identical": sum(r.identical for r in results),
        "inconsistent": sum(r.inconsistent for r in judged),
        "ties": sum(r.score == 0.5 and not r.inconsistent for r in judged),
        "invalid": sum(not r.valid for r in results),
        "first_position_rate": sum(rates) / len(rates) if rates else None,
    }


class PairwiseJudge(ABC):
    """Compares two answers to the same prompt."""

    name = "judge"

    @abstractmethod
    def judge(
        self, prompts: Sequence[Messages], first: Sequence[str], second: Sequence[str]
    ) -> list[float | None]:
        """Per pair: probability that ``first[i]`` is better than ``second[i]`` (None: no verdict)."""


def judge_both_orders(
    judge: PairwiseJudge, prompts: Sequence[Messages], answers_a: Sequence[str], answers_b: Sequence[str]
) -> list[PairResult]:
    """Judge every pair in both orders in one call (so a remote judge sees all requests at once)."""
    n = len(prompts)
    if not (len(answers_a) == len(answers_b) == n):
        raise ValueError("prompts, answers_a and answers_b must have the same length")
    verdicts = judge.judge(
        list(prompts) + list(prompts), list(answers_a) + list(answers_b), list(answers_b) + list(answers_a)
    )
    return [PairResult(verdicts[i], verdicts[n + i]) for i in range(n)]


# ------------------------------------------------------------------------------------------ reward model


# ------------------------------------------------------------------------------------------ OpenAI-compatible
