"""Figures: a metric against the swept field (lines) or per group (bars), with baselines."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.stages.report.collect import collect, number_or_none
from pipeline.stages.report.tables import fmt_x, interval_note

_MAX_TICKS = 12


def figure_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", metric.replace("@", "_at_")).strip("_") + ".png"


def use_log2(xs: list[float]) -> bool:
    """Log2 axis when the positive sizes grow geometrically (e.g. 1k, 2k, 4k ...) over at least 4x."""
    pos = sorted({x for x in xs if x > 0})
    if len(pos) < 2 or pos[-1] / pos[0] < 4:
        return False
    return all(math.log2(b / a) >= 0.5 for a, b in zip(pos, pos[1:], strict=False))


def _save_png(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _new_figure():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        raise PipelineError("matplotlib is not installed: pip install matplotlib") from None
    fig = Figure(figsize=(6.4, 4.2))
    return fig, fig.subplots()


def _colors(groups: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {g: palette[i % len(palette)] for i, g in enumerate(groups)}


def _error(a: dict[str, Any]) -> tuple[float, float]:
    """(below, above) the mean: t-intervals are symmetric, a run's own Wilson interval is not."""
    if a["ci_low"] is None or a["ci_high"] is None:
        return 0.0, 0.0
    return max(0.0, a["mean"] - a["ci_low"]), max(0.0, a["ci_high"] - a["mean"])


def _yerr(errors: list[tuple[float, float]]):
    return [[e[0] for e in errors], [e[1] for e in errors]]


def draw_lines(path, metric, aggs, groups, x_name, log_x, baselines) -> None:
    fig, ax = _new_figure()
    colors = _colors(groups)
    xs = sorted({a["x"] for a in aggs})
    positive = [x for x in xs if x > 0]
    log = {"true": True, "false": False}.get(log_x, use_log2(xs)) and bool(positive)
    zero_pos = 0.0
    if log:
        ax.set_xscale("log", base=2)
        zero_pos = min(positive) / 2**1.5
        if 0.0 in xs:
            ax.axvline(min(positive) / 2**0.75, color="0.8", linewidth=0.8, linestyle=":")
    shown_zero = False
    for g in groups:
        points = [a for a in aggs if a["group"] == g]
        if not points:
            continue
        pos = [zero_pos if a["x"] == 0 and log else a["x"] for a in points]
        means = [a["mean"] for a in points]
        err = [_error(a) for a in points]
        trained = [i for i, a in enumerate(points) if a["x"] != 0]
        zero = [i for i, a in enumerate(points) if a["x"] == 0]
        if trained:
            ax.errorbar(
                [pos[i] for i in trained],
                [means[i] for i in trained],
                yerr=_yerr([err[i] for i in trained]),
                color=colors[g],
                marker="o",
                markersize=4,
                capsize=3,
                linewidth=1.5,
                label=g,
            )
        if zero:
            i = zero[0]
            ax.errorbar(
                [pos[i]],
                [means[i]],
                yerr=_yerr([err[i]]),
                color=colors[g],
                marker="o",
                mfc="white",
                capsize=3,
                label=None if trained else g,
            )
            if trained:
                j = trained[0]
                ax.plot([pos[i], pos[j]], [means[i], means[j]], color=colors[g], linestyle=":", linewidth=1)
            shown_zero = True
    _draw_baselines(ax, metric, baselines)
    ticks = sorted({zero_pos if x == 0 and log else x for x in xs})
    if len(ticks) <= _MAX_TICKS:
        ax.set_xticks(ticks)
        ax.set_xticklabels([fmt_x(0.0 if t == zero_pos and 0.0 in xs else t) for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(x_name + (" (log scale)" if log else ""))
    ax.set_ylabel(metric)
    note = interval_note(aggs)
    if shown_zero:
        note += "; hollow: no training (x = 0)"
    ax.set_title(f"{metric} vs {x_name}\n{note}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save_png(fig, path)


def draw_bars(path, metric, aggs, groups, baselines) -> None:
    fig, ax = _new_figure()
    colors = _colors(groups)
    labels, heights, errs, bar_colors, hatches = [], [], [], [], []
    for g in groups:
        for a in sorted((a for a in aggs if a["group"] == g), key=lambda a: not a["before_training"]):
            labels.append(f"{g}\n(before)" if a["before_training"] else g)
            heights.append(a["mean"])
            errs.append(_error(a))
            bar_colors.append(colors[g])
            hatches.append("//" if a["before_training"] else "")
    yerr = _yerr(errs) if any(any(e) for e in errs) else None
    bars = ax.bar(range(len(labels)), heights, yerr=yerr, capsize=4, color=bar_colors)
    for bar, hatch, color in zip(bars, hatches, bar_colors, strict=True):
        if hatch:
            bar.set_facecolor((*color[:3], 0.35))
            bar.set_edgecolor(color)
            bar.set_hatch(hatch)
    for i, (h, (below, above)) in enumerate(zip(heights, errs, strict=True)):
        ax.annotate(
            f"{h:.3g}",
            (i, h + above if h >= 0 else h - below),
            xytext=(0, 3 if h >= 0 else -3),
            textcoords="offset points",
            ha="center",
            va="bottom" if h >= 0 else "top",
            fontsize=8,
        )
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    _draw_baselines(ax, metric, baselines)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}\n{interval_note(aggs)}", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    _save_png(fig, path)


def _draw_baselines(ax, metric: str, baselines: list[Baseline]) -> None:
    styles = ["--", "-.", ":"]
    for i, b in enumerate(x for x in baselines if metric in x.values):
        value = b.values[metric]
        ax.axhline(
            value, color="0.25", linestyle=styles[i % 3], linewidth=1.2, label=f"{b.name} ({value:.3g})"
        )


@dataclass
class Baseline:
    name: str
    spec: str
    values: dict[str, float]


def parse_baseline(spec: str) -> tuple[str, str | None, str]:
    """`NAME=VALUE`, `NAME=RUN_DIR` or `METRIC:NAME=...` -> (name, metric or None, value text)."""
    key, eq, value = spec.partition("=")
    if not eq or not key or not value:
        raise PipelineError(f"--baseline: expected NAME=VALUE or NAME=RUN_DIR, got '{spec}'")
    metric, colon, name = key.partition(":")
    return (name, metric, value) if colon else (key, None, value)


def resolve_baselines(specs: list[str], metrics: list[str], label_of) -> list[Baseline]:
    out = []
    for spec in specs:
        name, metric, value = parse_baseline(spec)
        if metric is not None and metric not in metrics:
            raise PipelineError(
                f"--baseline {spec}: metric '{metric}' is not reported (metrics: {', '.join(metrics)})"
            )
        wanted = [metric] if metric else metrics
        number = number_or_none(value)
        if number is not None:
            if len(wanted) > 1:
                raise PipelineError(
                    f"--baseline {spec}: several metrics are reported ({', '.join(metrics)}); "
                    f"say which one the value is for, e.g. {metrics[0]}:{spec}"
                )
            out.append(Baseline(name, spec, {m: number for m in wanted}))
            continue
        folder = Path(value)
        if not folder.exists():
            raise PipelineError(f"--baseline {spec}: '{value}' is neither a number nor a run folder")
        records, _ = collect([folder], [], label_of)
        if not records:
            raise PipelineError(f"--baseline {spec}: no completed run.json under '{value}'")
        named = [r for r in records if name in (r.group, r.model, r.stage)]
        pool = named or records
        values = {}
        for m in wanted:
            found = [r for r in pool if m in r.metrics]
            labels = sorted({r.group for r in found})
            if len(labels) > 1 and not named:
                raise PipelineError(
                    f"--baseline {spec}: the runs under '{value}' have {m} for several groups "
                    f"({', '.join(labels)}); name the baseline after one of them, e.g. {labels[0]}={value}"
                )
            if found:
                values[m] = sum(r.metrics[m] for r in found) / len(found)
        if not values:
            have = sorted({k for r in pool for k in r.metrics})
            raise PipelineError(
                f"--baseline {spec}: the runs under '{value}' have none of {', '.join(wanted)} "
                f"(they have: {', '.join(have) or 'no metrics'})"
            )
        out.append(Baseline(name, spec, values))
    return out
