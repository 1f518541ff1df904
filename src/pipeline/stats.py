"""Statistics the stages print: pass@k (the unbiased estimator); 95% intervals over problems — Wilson's
score interval when every problem's value is 0 or 1 (greedy pass@1), else a seeded percentile bootstrap
over prompts — and Student-t intervals over seeds. Pure functions, no model code."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples of which ``c`` are correct (needs ``n >= k``).

    1 - C(n-c, k) / C(n, k) as the product prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials, no overflow.
    """
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k holds a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def estimate_pass_at_k(counts: dict[str, tuple[int, int]], ks: Sequence[int], resamples: int = 1000,
                       seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """``pass@k`` averaged over every problem evaluated, for each k every problem has samples for: all the
    reported ks describe the same problems. A k above the smallest sample count is not reported (None) and
    ``not_reported`` says why; ``problems`` is how many were evaluated. Each reported k has its 95% interval
    over problems (``pass@k_ci_low``/``_ci_high``, ``pass@k_interval``: Wilson when each problem's pass@k is
    0 or 1, as with one sample each, else a bootstrap of ``resamples`` seeded by ``seed``)."""
    out: dict[str, Any] = {}
    not_reported: dict[str, str] = {}
    fewest = min((n for n, _ in counts.values()), default=0)
    for k in ks:
        short = sum(n < k for n, _ in counts.values())
        if not counts or short:
            out[f"pass@{k}"] = None
            not_reported[f"pass@{k}"] = (f"{short} of {len(counts)} problems have fewer than {k} samples (the "
                                         f"fewest: {fewest}); every pass@k is over the same problems") if counts else "no problems"  # fmt: skip
            continue
        agg = interval_over_problems([pass_at_k(n, c, k) for n, c in counts.values()], resamples, seed, k)
        out[f"pass@{k}"] = agg["mean"]
        out.update({f"pass@{k}_ci_low": agg["ci_low"], f"pass@{k}_ci_high": agg["ci_high"],
                    f"pass@{k}_interval": agg["interval"]})  # fmt: skip
    out["problems"] = len(counts)
    out["not_reported"] = not_reported
    return out


def stable_seed(*parts: Any) -> int:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def pass_at_k_of(flags: list[bool | None], ks: list[int]) -> dict[str, float | None]:
    if any(f is None for f in flags):
        return {f"pass@{k}": None for k in ks}
    n, c = len(flags), sum(bool(f) for f in flags)
    return {f"pass@{k}": pass_at_k(n, c, k) if k <= n else None for k in ks}


def bootstrap(values: list[float | None], resamples: int, *seed_parts: Any) -> dict[str, Any]:
    """Mean of the non-None values and a percentile bootstrap 95% interval over them (seeded)."""
    import numpy as np

    vals = np.asarray([v for v in values if v is not None], dtype=float)
    out: dict[str, Any] = {"mean": None, "ci_low": None, "ci_high": None, "n": int(len(vals))}
    if not len(vals):
        return out
    out["mean"] = float(vals.mean())
    if resamples:
        rng = np.random.default_rng(stable_seed(*seed_parts))
        means = []
        per_chunk = max(1, 2_000_000 // len(vals))  # bounded memory for large prompt sets
        for done in range(0, resamples, per_chunk):
            size = min(per_chunk, resamples - done)
            means.append(vals[rng.integers(0, len(vals), size=(size, len(vals)))].mean(axis=1))
        low, high = np.quantile(np.concatenate(means), [0.025, 0.975])
        out["ci_low"], out["ci_high"] = float(low), float(high)
    return out


Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion ``successes / n`` (95% by default).

    center = (p + z²/2n) / (1 + z²/n), half = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n). Unlike a bootstrap it
    does not collapse at 0/n or n/n (0 of 52: 0–0.069), and it keeps its coverage at small n.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"a Wilson interval needs 0 <= successes <= n and n >= 1, got {successes}/{n}")
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def interval_over_problems(values: list[float | None], resamples: int, *seed_parts: Any) -> dict[str, Any]:
    """Mean of the non-None per-problem values and its 95% interval, naming the method in ``interval``:
    "wilson" when every value is 0 or 1 (each problem a Bernoulli draw), else "bootstrap" over prompts
    (seeded; ``resamples`` 0: no interval, ``interval`` None)."""
    kept = [v for v in values if v is not None]
    if kept and all(v in (0, 1) for v in kept):
        low, high = wilson_interval(int(sum(kept)), len(kept))
        return {"mean": sum(kept) / len(kept), "ci_low": low, "ci_high": high, "n": len(kept),
                "interval": "wilson"}  # fmt: skip
    out = bootstrap(kept, resamples, *seed_parts)
    out["interval"] = "bootstrap" if out["ci_low"] is not None else None
    return out


INTERVAL_NAMES = {"wilson": "Wilson 95%", "bootstrap": "bootstrap 95% over prompts", None: "no interval"}


def _t_central_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df (closed form, Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        if df == 1:
            return 2 * theta / math.pi
        term = acc = c
        for k in range(3, df - 1, 2):
            term *= c * c * (k - 1) / k
            acc += term
        return 2 / math.pi * (theta + s * acc)
    term = acc = 1.0
    for k in range(2, df - 1, 2):
        term *= c * c * (k - 1) / k
        acc += term
    return s * acc


def t_critical(df: int, level: float = 0.95) -> float:
    """Two-sided critical value of Student's t: P(|T| <= t) = level (t_{0.975, df} for level 0.95)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    lo, hi = 0.0, 2.0
    while _t_central_mass(hi, df) < level:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if _t_central_mass(mid, df) < level:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def per_seed_means(values: list[float], seeds: list[Any]) -> tuple[list[float], list[Any]]:
    """The mean of the values of each seed (in first-seen order): repeated measurements of one seed's
    starting point (a `*_before` value logged by every size of a sweep) are one observation, not many."""
    by_seed: dict[Any, list[float]] = {}
    for value, seed in zip(values, seeds, strict=True):
        by_seed.setdefault(seed, []).append(value)
    return [sum(v) / len(v) for v in by_seed.values()], list(by_seed)


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and half-width of the 95% t-interval (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_critical(n - 1) * sd / math.sqrt(n)
