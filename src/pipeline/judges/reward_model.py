"""A judge that scores both answers with a scalar reward model: the higher score wins."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pipeline.errors import PipelineError
from pipeline.judges.base import Messages, PairwiseJudge

logger = logging.getLogger("pipeline.judges")


class RewardModelJudge(PairwiseJudge):
    """Scores answers with a scalar reward model; the higher score is the better answer."""

    name = "reward_model"

    def __init__(
        self, tokenizer, model, batch_size: int = 8, max_length: int | None = None, cache: bool = True
    ):
        self.tokenizer = tokenizer
        self.model = model
        self.batch_size = max(1, batch_size)
        self.max_length = max_length
        self.keep_scores = cache  # off in training, where inputs rarely repeat and the cache would only grow
        self._cache: dict[tuple[int, ...], float] = {}

    def score(
        self, prompts: Sequence[Messages], answers: Sequence[str], progress: str | None = None
    ) -> list[float]:
        """One scalar reward per (prompt, answer); each distinct input is scored once."""
        import torch
        from tqdm.auto import tqdm

        from pipeline.tokenization import PromptError, reward_model_input_ids

        try:
            inputs = [
                tuple(reward_model_input_ids(self.tokenizer, p, a))
                for p, a in zip(prompts, answers, strict=True)
            ]
        except PromptError as err:
            raise PipelineError(f"reward_model_path: {err}") from None
        if self.max_length is not None:
            inputs = [ids[: self.max_length] for ids in inputs]
        todo = sorted({ids for ids in inputs if ids not in self._cache}, key=len)
        device = next(self.model.parameters()).device
        batches = range(0, len(todo), self.batch_size)
        for start in tqdm(batches, desc=progress, disable=progress is None or not todo, unit="batch"):
            chunk = todo[start : start + self.batch_size]
            enc = self.tokenizer.pad(
                {"input_ids": [list(ids) for ids in chunk]}, return_tensors="pt", padding_side="right"
            ).to(device)
            with torch.no_grad():
                logits = self.model(**enc).logits
            for ids, value in zip(chunk, logits[:, 0].float().tolist(), strict=True):
                self._cache[ids] = value
        scores = [self._cache[ids] for ids in inputs]
        if not self.keep_scores:
            self._cache.clear()
        return scores

    def judge(self, prompts, first, second):
        scores = self.score(list(prompts) * 2, list(first) + list(second))
        n = len(prompts)
        out: list[float | None] = []
        for a, b in zip(scores[:n], scores[n:], strict=True):
            out.append(1.0 if a > b else 0.0 if a < b else 0.5)
        return out
