"""Pairwise judges: which of two answers to the same prompt is better.

A judge returns, per pair, the probability that the *first* answer is the better one: 1.0, 0.0, 0.5 for a
tie, or None when it gave no usable verdict (an invalid judgement). :func:`judge_both_orders` asks for both
orders, (a, b) and (b, a), and averages ``p(a, b)`` with ``1 - p(b, a)``: a judge that always prefers
whichever answer it sees first then scores every pair 0.5, so position bias cancels. A pair is invalid when
either order is.

- :class:`RewardModelJudge`: a scalar reward model (a `pipeline rm` output) scores each (prompt, answer);
  the higher score wins, equal scores tie. Scores are memoised by text, so identical answers tie exactly.
- :class:`OpenAIJudge`: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, TGI, llama.cpp
  server, ...), called with the standard library only. The API key is read from the environment variable
  whose *name* is given (never logged, never written), and sent only to the configured origin: over https
  or to this machine (over plain http elsewhere only with `allow_http_key`), and never after a redirect (a redirect is a one-line error
  naming where it pointed). Connection errors, timeouts, HTTP 429 and 5xx are retried with exponential
  back-off and jitter, waiting at least what a `Retry-After` header asks (at most `MAX_RETRY_WAIT` s); after
  the last try the error is one line (a `PipelineError`). A reply over `MAX_REPLY_BYTES` is refused. With a
  `cache_path`, every verdict is appended there as it arrives, keyed by the endpoint, model, settings and
  the full request text, so a rerun after a failure asks only what is missing. Other
  HTTP errors (401, 404, ...) and a 200 reply that is not a chat completion (an HTML page, garbage) are
  one-line errors at once: the endpoint is misconfigured, and retrying would not help. A valid chat
  completion whose text does not start with the verdict letter (``A`` or ``B``) is an invalid judgement:
  counted, and left out of the win-rate.
"""

from pipeline.judges.base import (
    DEFAULT_JUDGE_TEMPLATE,
    PairResult,
    PairwiseJudge,
    conversation_text,
    judge_both_orders,
    pair_diagnostics,
    verdict_of,
)
from pipeline.judges.openai import MAX_REPLY_BYTES, OpenAIJudge, VerdictCache
from pipeline.judges.reward_model import RewardModelJudge

__all__ = [
    "DEFAULT_JUDGE_TEMPLATE",
    "MAX_REPLY_BYTES",
    "OpenAIJudge",
    "PairResult",
    "PairwiseJudge",
    "RewardModelJudge",
    "VerdictCache",
    "conversation_text",
    "judge_both_orders",
    "pair_diagnostics",
    "verdict_of",
]
