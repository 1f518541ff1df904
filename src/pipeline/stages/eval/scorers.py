"""Scorers: sandboxed pass@k, the reward model's mean score, and the pairwise judge against the baseline."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any

from pipeline.judges import (
    DEFAULT_JUDGE_TEMPLATE,
    OpenAIJudge,
    PairResult,
    PairwiseJudge,
    RewardModelJudge,
    judge_both_orders,
    pair_diagnostics,
)
from pipeline.stages.eval.config import EvalConfig, PromptItem, needs_reward_model
from pipeline.stages.eval.generation import torch_dtype
from pipeline.stages.eval.write import mean_of
from pipeline.stats import interval_over_problems, pass_at_k_of

logger = logging.getLogger("pipeline.eval")


def score_code(
    items: list[PromptItem], answers: dict[str, dict[str, list[str]]], cfg: EvalConfig
) -> dict[str, dict[str, list[bool | None]]]:
    """model -> prompt key -> per answer: passed every test (None: the prompt has no tests). One sandbox
    pool for every model's answers."""
    from pipeline.rewards import code_execution_reward, humaneval_reward

    jobs = [
        (m, it, s, a) for m, by_key in answers.items() for it in items for s, a in enumerate(by_key[it.key])
    ]
    passed: dict[str, dict[str, list[bool | None]]] = {
        m: {it.key: [None] * cfg.num_samples for it in items} for m in answers
    }
    options = {"timeout": cfg.code_timeout, "workers": cfg.code_workers}
    plain = [j for j in jobs if j[1].humaneval is None]
    if plain:
        rewards = code_execution_reward([j[3] for j in plain], [j[1].tests for j in plain], **options)
        for (m, it, s, _), r in zip(plain, rewards, strict=True):
            passed[m][it.key][s] = None if r is None else r >= 1.0  # 2 * fraction - 1 == 1: every test passed
    humaneval = [j for j in jobs if j[1].humaneval is not None]
    if humaneval:
        rewards = humaneval_reward(
            [j[1].messages for j in humaneval],
            [[{"role": "assistant", "content": j[3]}] for j in humaneval],
            [j[1].humaneval["test"] for j in humaneval],
            [j[1].humaneval["entry_point"] for j in humaneval],
            [j[1].humaneval.get("code_prompt") for j in humaneval],
            **options,
        )
        for (m, it, s, _), r in zip(humaneval, rewards, strict=True):
            passed[m][it.key][s] = None if r is None else r >= 1.0
    return passed


def build_judge(cfg: EvalConfig, rm_judge: RewardModelJudge | None) -> PairwiseJudge:
    if cfg.judge == "reward_model":
        assert rm_judge is not None
        return rm_judge
    judge = OpenAIJudge(
        base_url=cfg.judge_base_url or "",
        model=cfg.judge_model or "",
        api_key_env=cfg.judge_api_key_env,
        timeout=cfg.judge_timeout,
        max_retries=cfg.judge_max_retries,
        backoff=cfg.judge_backoff,
        concurrency=cfg.judge_concurrency,
        max_tokens=cfg.judge_max_tokens,
        template=cfg.judge_template or DEFAULT_JUDGE_TEMPLATE,
        allow_http_key=cfg.judge_allow_http_key,
    )
    if cfg.judge_api_key_env and not os.environ.get(cfg.judge_api_key_env):
        logger.info(
            "eval: no %s in the environment; the judge is called without an API key", cfg.judge_api_key_env
        )
    return judge


def pairwise(
    judge: PairwiseJudge,
    items: list[PromptItem],
    answers: dict[str, dict[str, list[str]]],
    baseline: str,
    skip_identical: bool,
) -> dict[str, dict[str, list[PairResult]]]:
    """model -> prompt key -> both-orders results of answer i against the baseline's answer i."""
    slots = []  # (model, prompt, sample) to ask the judge about
    results: dict[str, dict[str, list[PairResult | None]]] = {}
    for model, by_key in answers.items():
        if model == baseline:
            continue
        results[model] = {}
        for it in items:
            row: list[PairResult | None] = []
            for s, (a, b) in enumerate(zip(by_key[it.key], answers[baseline][it.key], strict=True)):
                if skip_identical and a == b:
                    row.append(PairResult(0.5, 0.5, identical=True))
                else:
                    row.append(None)
                    slots.append((model, it, s, a, b))
            results[model][it.key] = row
    if slots:
        judged = judge_both_orders(
            judge, [s[1].messages for s in slots], [s[3] for s in slots], [s[4] for s in slots]
        )
        for (model, it, s, _, _), res in zip(slots, judged, strict=True):
            results[model][it.key][s] = res
    return results  # type: ignore[return-value]


def score_all(cfg, items, answers, baseline, judge):
    """(per-prompt rows, per-answer rows, model -> metric -> mean and 95% interval, judge statistics).
    Intervals are over prompts: Wilson's where each prompt's value is 0 or 1, else a bootstrap."""
    code = score_code(items, answers, cfg) if "code" in cfg.scorers else None
    rm_judge = _reward_model_judge(cfg) if needs_reward_model(cfg) else None
    rewards: dict[str, dict[str, list[float]]] = {}
    if "reward_model" in cfg.scorers:
        flat = [(m, it, a) for m in answers for it in items for a in answers[m][it.key]]
        scores = rm_judge.score([f[1].messages for f in flat], [f[2] for f in flat], progress="reward model")
        for (m, it, _), value in zip(flat, scores, strict=True):
            rewards.setdefault(m, {}).setdefault(it.key, []).append(value)
    pairs = None
    judge_stats: dict[str, Any] = {}
    if "pairwise_judge" in cfg.scorers:
        judge = judge or build_judge(cfg, rm_judge)
        pairs = pairwise(judge, items, answers, baseline, cfg.judge_skip_identical)
        judge_stats = _judge_stats(cfg, judge, pairs)
    rows, samples, series = _per_prompt_rows(cfg, items, answers, baseline, code, rewards, pairs)
    aggregates = {
        model: {
            name: interval_over_problems(values, cfg.bootstrap_samples, cfg.seed, model, name)
            for name, values in by.items()
        }
        for model, by in series.items()
    }
    if pairs is not None:
        for model, by_key in pairs.items():
            results = [r for row in by_key.values() for r in row]
            aggregates[model]["win_rate"].update(baseline=baseline, **pair_diagnostics(results))
    return rows, samples, aggregates, judge_stats


def _reward_model_judge(cfg) -> RewardModelJudge:
    import torch

    from pipeline.models import load_reward_model

    tokenizer, model = load_reward_model(cfg.reward_model_path, dtype=torch_dtype(cfg.dtype))
    if torch.cuda.is_available():
        model = model.to("cuda")
    return RewardModelJudge(tokenizer, model, cfg.batch_size, cfg.reward_max_length)


def _judge_stats(cfg, judge, pairs) -> dict[str, Any]:
    all_pairs = [r for by_key in pairs.values() for row in by_key.values() for r in row]
    stats = {"judge": cfg.judge, **{f"judge_{k}": v for k, v in pair_diagnostics(all_pairs).items()}}
    if isinstance(judge, OpenAIJudge):
        stats["judge_requests"] = judge.requests
        stats["judge_cached"] = judge.cached
    return stats


def _per_prompt_rows(cfg, items, answers, baseline, code, rewards, pairs):
    """(one row per model and prompt, one per answer, model -> metric -> per-prompt values)."""
    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    series: dict[str, dict[str, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for model in answers:
        for it in items:
            for s, answer in enumerate(answers[model][it.key]):
                sample: dict[str, Any] = {"model": model, "prompt_id": it.prompt_id, "sample_index": s}
                if code is not None:
                    sample["passed"] = code[model][it.key][s]
                if model in rewards:
                    sample["reward"] = rewards[model][it.key][s]
                if pairs is not None and model != baseline:
                    sample["win"] = pairs[model][it.key][s].score
                samples.append({**sample, "answer": answer})
            row: dict[str, Any] = {"model": model, "prompt_id": it.prompt_id, "num_samples": cfg.num_samples}
            if code is not None:
                flags = code[model][it.key]
                row["num_passed"] = None if any(f is None for f in flags) else sum(bool(f) for f in flags)
                row.update(pass_at_k_of(flags, cfg.pass_k))
            if model in rewards:
                row["reward"] = mean_of(rewards[model][it.key])
            if pairs is not None and model != baseline:
                results = pairs[model][it.key]
                row["win_rate"] = mean_of([r.score for r in results])
                row["judge_invalid"] = sum(not r.valid for r in results)
            for name in [f"pass@{k}" for k in cfg.pass_k] + ["reward", "win_rate"]:
                if name in row:
                    series[model][name].append(row[name])
            rows.append(row)
    return rows, samples, series
