"""Reward transforms and filters (clip, normalize, datafilter) and the prompt-hash split."""

from __future__ import annotations

import logging

import numpy as np

from pipeline.errors import PipelineError
from pipeline.stages.prepare.config import PrepareConfig
from pipeline.stages.prepare.scan import RowIndex

logger = logging.getLogger("pipeline.prepare")


def parse_clip(spec: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in spec.split(","))
    except ValueError:
        raise PipelineError(f"reward_clip must be 'lo,hi' (e.g. '-1.5,1.5'), got {spec!r}") from None
    if not lo < hi:
        raise PipelineError(f"reward_clip: lo must be below hi, got {spec!r}")
    return lo, hi


def normalize(values: np.ndarray, method: str) -> np.ndarray:
    """One group's rewards normalized; a constant group maps to 0 (zscore, rank) or 0.5 (minmax)."""
    if method == "none" or len(values) == 0:
        return values
    if method == "zscore":
        std = values.std()
        return (values - values.mean()) / std if std > 0 else np.zeros_like(values)
    if method == "minmax":
        span = values.max() - values.min()
        return (values - values.min()) / span if span > 0 else np.full_like(values, 0.5)
    # rank: average ranks of ties, scaled to [-1, 1]
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=np.float64)
    uniq, inverse = np.unique(values, return_inverse=True)
    mean_rank = np.bincount(inverse, weights=ranks) / np.bincount(inverse)
    ranks = mean_rank[inverse]
    return 2 * ranks / (len(values) - 1) - 1 if len(values) > 1 else np.zeros_like(values)


def transform_rewards(index: RowIndex, keep: np.ndarray, cfg: PrepareConfig) -> np.ndarray:
    """Clip then normalize the kept rows' rewards (globally or per prompt); dropped rows get NaN."""
    out = np.full(len(index.rewards), np.nan)
    values = index.rewards[keep]
    if cfg.reward_clip:
        values = np.clip(values, *parse_clip(cfg.reward_clip))
    if cfg.normalize_per_prompt and cfg.reward_normalize != "none":
        groups = index.prompt_keys[keep]
        order = np.argsort(groups, kind="stable")
        bounds = np.flatnonzero(np.diff(groups[order])) + 1
        for chunk in np.split(order, bounds):
            values[chunk] = normalize(values[chunk], cfg.reward_normalize)
    else:
        values = normalize(values, cfg.reward_normalize)
    out[keep] = values
    return out


def top_k_mask(keys: np.ndarray, rewards: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    """The k highest-reward kept rows of each prompt (ties: earlier row first)."""
    rows = np.flatnonzero(keep)
    order = rows[np.lexsort((rows, -rewards[rows], keys[rows]))]
    group_start = np.r_[True, keys[order][1:] != keys[order][:-1]]
    position = np.arange(len(order)) - np.maximum.accumulate(np.where(group_start, np.arange(len(order)), 0))
    mask = np.zeros(len(keys), dtype=bool)
    mask[order[position < k]] = True
    return mask


def apply_datafilter(
    index: RowIndex, rewards: np.ndarray, keep: np.ndarray, cfg: PrepareConfig
) -> np.ndarray:
    if cfg.datafilter == "posonly":
        return keep & (rewards > cfg.pos_threshold)
    if cfg.datafilter == "negonly":
        return keep & (rewards <= cfg.neg_threshold)
    if cfg.datafilter == "topk_per_prompt":
        if cfg.topk < 1:
            raise PipelineError(f"topk must be >= 1, got {cfg.topk}")
        return keep & top_k_mask(index.prompt_keys, rewards, keep, cfg.topk)
    return keep


def split_of(keys: np.ndarray, eval_fraction: float) -> np.ndarray:
    """True where the prompt is held out: its hash, read as a fraction in [0, 1), is below eval_fraction."""
    return (keys >> np.uint64(11)).astype(np.float64) / float(1 << 53) < eval_fraction
