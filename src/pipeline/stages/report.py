"""Report stage: every run's metrics in one CSV, figures, a LaTeX table and a Markdown summary.

    pipeline report runs/sweep --x train_size --metrics pass@1 eval_reward --baseline pass@1:SFT=0.46
    pipeline report runs/a runs/b --output_dir runs/report --group_by stage,loss_type

Every `run.json` under the given folders is read (recursively; a folder that is itself a stage's output
counts too). Runs whose status is not `completed` are skipped and counted. Each run is one record: its
stage, seed and final metrics; an `eval` run is one record per model it evaluated (its metrics are stored
as `<model>/<metric>`), labelled by the model's name (an eval model named `sft`, the folder name of a
pipeline's `sft` stage, shares that stage's group: one line, one colour).

- `--x FIELD`: the swept field on the x-axis (e.g. `train_size`). It is looked up in the run's `sweep`
  mapping, its `config`, the top level of run.json (`seed`), a `FIELD=value` folder name on its path, the
  run.json of an enclosing folder, and finally the other stage folders beside it (when they agree), so an
  `eval` stage inherits the sweep values of the training stages of its pipeline run.
- `--group_by`: one line (or bar) per group: `stage` (an eval run's models are their own groups) and/or
  config fields, comma-separated (`stage,loss_type`).
- `--metrics`: default: the headline metrics found (pass@k, eval_reward, reward, win_rate,
  eval_accuracy, eval_loss).
- `--baseline NAME=VALUE` or `NAME=RUN_DIR` (the mean of that folder's runs, those of group, stage or
  model NAME where there are some; it is not collected as a run), for one metric: `pass@1:SFT=0.46` (a
  number needs the metric when several are reported). Drawn as dashed horizontal lines.

Per group, x value and metric: the mean over runs (seeds) and the half-width of the 95% Student-t interval
(n >= 2; a single run shows its value). With `--x`, each metric is drawn against x (log2 axis when the
sizes grow geometrically), one line per group with 95% error bars; x = 0 is the zero-training point: runs
at x = 0, or else the runs' `<metric>_before` values (`--before_point false` turns that off). Without
`--x`, a bar chart per metric. Writes into `--output_dir` (default `RUN_DIR/report` for one folder), each
file under a temporary name then renamed: `runs.csv` (one row per record), one PNG per metric,
`table.tex` (booktabs), `summary.md` (the same table and the figures) and `report.json` (the aggregates).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import outputs
from pipeline.errors import PipelineError
from pipeline.runinfo import RUN_FILE, atomic_write_text
from pipeline.stats import mean_ci

HEADLINE = ("eval_reward", "reward", "win_rate", "eval_accuracy", "eval_loss")
# config fields that differ between every run without being a swept setting
_NOT_SWEPT = {"output_dir", "run_name", "logging_dir", "hub_model_id", "answers_cache", "config"}
_MAX_TICKS = 12
_PRUNE_DIRS = {"wandb", "answers", "__pycache__"}


# ------------------------------------------------------------------------------------------ statistics


# ------------------------------------------------------------------------------------------ collection


@dataclass
class Record:
    """One completed run, or one model of a completed eval run."""

    run_dir: Path
    stage: str
    status: str
    seed: Any
    model: str | None
    metrics: dict[str, float]
    config: dict[str, Any]
    start: str
    order: int
    x: float | None = None
    group: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    model_path: str | None = None  # an eval record's model folder


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def find_run_files(dirs: list[Path], exclude: list[Path]) -> list[Path]:
    """Every run.json under `dirs` (sorted, each once), outside the `exclude` folders."""
    excluded = {p.resolve() for p in exclude}
    found: dict[Path, None] = {}
    for root in dirs:
        if root.is_file():
            if root.name == RUN_FILE:
                found[root] = None
            continue
        for current, subdirs, files in os.walk(root):
            here = Path(current)
            subdirs[:] = sorted(
                d
                for d in subdirs
                if not d.startswith(".") and d not in _PRUNE_DIRS and (here / d).resolve() not in excluded
            )
            if RUN_FILE in files and here.resolve() not in excluded:
                found[here / RUN_FILE] = None
    return list(found)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _eval_models(run: dict[str, Any], run_dir: Path) -> list[tuple[str, str | None]]:
    """(name, path) of each model of an eval run: eval.json's, else the config's (as `pipeline eval` names
    them), else the `<model>/` prefixes of its metrics."""
    report = _read_json(run_dir / "eval.json")
    if report and isinstance(report.get("models"), dict) and report["models"]:
        return [
            (str(n), (m or {}).get("path") if isinstance(m, dict) else None)
            for n, m in report["models"].items()
        ]
    cfg = run.get("config") or {}
    paths = [str(m) for m in cfg.get("models") or []]
    names = [str(n) for n in cfg.get("model_names") or []] or [Path(m.rstrip("/")).name or m for m in paths]
    if names:
        return [(n, paths[i] if len(paths) == len(names) else None) for i, n in enumerate(names)]
    return [(n, None) for n in sorted({k.split("/", 1)[0] for k in run.get("metrics") or {} if "/" in k})]


def records_of(run: dict[str, Any], run_dir: Path, order: int) -> list[Record]:
    metrics = run.get("metrics") if isinstance(run.get("metrics"), dict) else {}
    numeric = {k: v for k, v in ((k, _number(v)) for k, v in metrics.items()) if v is not None}
    common = dict(
        run_dir=run_dir,
        stage=str(run.get("stage") or run_dir.name),
        status=str(run.get("status")),
        seed=run.get("seed"),
        config=run.get("config") if isinstance(run.get("config"), dict) else {},
        start=str(run.get("start") or ""),
    )
    if common["stage"] != "eval":
        return [Record(model=None, metrics=numeric, order=order, **common)]
    models = _eval_models(run, run_dir)
    shared = {k: v for k, v in numeric.items() if not any(k.startswith(f"{m}/") for m, _ in models)}
    out = []
    for i, (model, path) in enumerate(models):
        own = {k[len(model) + 1 :]: v for k, v in numeric.items() if k.startswith(f"{model}/")}
        out.append(
            Record(model=model, metrics={**shared, **own}, order=order * 1000 + i, model_path=path, **common)
        )
    return out


class FieldLookup:
    """Finds a field's value for a run: its own run.json, its path, enclosing runs, sibling stages."""

    def __init__(self, runs: dict[Path, dict[str, Any]]):
        self.runs = runs  # run folder -> run.json content (every status)

    @staticmethod
    def _own(run: dict[str, Any], name: str) -> Any:
        for source in (run.get("sweep"), run.get("config"), run):
            if isinstance(source, dict) and name in source and not isinstance(source[name], (dict, list)):
                return source[name]
        return None

    def get(self, run_dir: Path, name: str) -> Any:
        value = self._own(self.runs.get(run_dir, {}), name)
        if value is not None:
            return value
        for part in reversed(run_dir.parts):
            for piece in part.split(","):
                key, eq, val = piece.partition("=")
                if eq and key == name:
                    return val
        for parent in run_dir.parents:
            if parent in self.runs:
                value = self._own(self.runs[parent], name)
                if value is not None:
                    return value
        siblings = {
            json.dumps(v)
            for d, run in self.runs.items()
            if d.parent == run_dir.parent and d != run_dir and (v := self._own(run, name)) is not None
        }
        return json.loads(siblings.pop()) if len(siblings) == 1 else None


def _x_value(value: Any, name: str, where: Path) -> float | None:
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise PipelineError(f"--x {name}: '{value}' in {where} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(x):
        raise PipelineError(f"--x {name}: '{value}' in {where} is not a number")
    return x


def varying_fields(records: list[Record]) -> list[str]:
    """Config fields whose (scalar, non-path) values differ between runs of one stage: the swept settings."""
    values: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in records:
        for key, value in r.config.items():
            if key in _NOT_SWEPT or isinstance(value, (dict, list)):
                continue
            if isinstance(value, str) and ("/" in value or os.sep in value):
                continue
            values[(r.stage, key)].add(json.dumps(value))
    return sorted({key for (_, key), v in values.items() if len(v) > 1})


# ------------------------------------------------------------------------------------------ aggregation


@dataclass
class Cell:
    group: str
    x: float | None
    metric: str
    values: list[float]
    seeds: list[Any]
    before: bool = False  # from `<metric>_before`: the zero-training point

    @property
    def n(self) -> int:
        return len(self.values)

    def summary(self) -> dict[str, Any]:
        mean, half = mean_ci(self.values)
        return {
            "group": self.group,
            "x": self.x,
            "metric": self.metric,
            "before_training": self.before,
            "n": self.n,
            "mean": mean,
            "ci95": half,
            "ci_low": None if half is None else mean - half,
            "ci_high": None if half is None else mean + half,
            "values": self.values,
            "seeds": self.seeds,
        }


def aggregate(
    records: list[Record], metrics: list[str], groups: list[str], use_x: bool, before_point: bool
) -> list[dict[str, Any]]:
    cells: dict[tuple, Cell] = {}
    for r in records:
        for m in metrics:
            if m in r.metrics:
                cell = cells.setdefault((r.group, r.x, m, False), Cell(r.group, r.x, m, [], []))
                cell.values.append(r.metrics[m])
                cell.seeds.append(r.seed)
    if before_point:
        for r in records:
            for m in metrics:
                has_zero = use_x and (r.group, 0.0, m, False) in cells
                if f"{m}_before" in r.metrics and (r.group, r.x, m, False) in cells and not has_zero:
                    x0 = 0.0 if use_x else None
                    cell = cells.setdefault((r.group, x0, m, True), Cell(r.group, x0, m, [], [], True))
                    cell.values.append(r.metrics[f"{m}_before"])
                    cell.seeds.append(r.seed)
    rank = {g: i for i, g in enumerate(groups)}

    def key(c: Cell):
        return (metrics.index(c.metric), rank[c.group], -1 if c.x is None else c.x, not c.before)

    return [c.summary() for c in sorted(cells.values(), key=key)]


# ------------------------------------------------------------------------------------------ formatting


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def fmt_x(x: float | None) -> str:
    if x is None:
        return ""
    if x == int(x):
        x = int(x)
        for unit, scale in (("M", 1_000_000), ("k", 1000)):
            if x >= scale and x % scale == 0:
                return f"{x // scale}{unit}"
        return str(x)
    return f"{x:g}"


def _cell_text(agg: dict[str, Any] | None, digits: int, pm: str, row_n: int) -> str:
    if agg is None:
        return "--" if pm != "±" else "–"
    text = _fmt(agg["mean"], digits)
    if agg["ci95"] is not None:
        text += f" {pm} {_fmt(agg['ci95'], digits)}"
    if agg["n"] != row_n:
        text += f" (n={agg['n']})"
    return text


def table_rows(aggs: list[dict[str, Any]], metrics: list[str], groups: list[str], use_x: bool):
    """[(group, x label, n, {metric: aggregate})] in group then x order."""
    rows: dict[tuple, dict[str, dict]] = {}
    for a in aggs:
        rows.setdefault((a["group"], a["x"], a["before_training"]), {})[a["metric"]] = a
    rank = {g: i for i, g in enumerate(groups)}
    out = []
    for (group, x, before), by_metric in sorted(
        rows.items(), key=lambda kv: (rank[kv[0][0]], -1 if kv[0][1] is None else kv[0][1], not kv[0][2])
    ):
        n = max(a["n"] for a in by_metric.values())
        if use_x:
            label = fmt_x(x) + (" (before)" if before else "")
            out.append((group, label, n, by_metric))
        else:
            out.append((group + (" (before training)" if before else ""), "", n, by_metric))
    return out


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def latex_table(rows, metrics: list[str], x_name: str | None, digits: int, caption: str) -> str:
    """A booktabs table float; `caption` is LaTeX already."""
    head = ["group"] + ([x_name] if x_name else []) + ["n"] + metrics
    spec = "l" + ("r" if x_name else "") + "r" + "c" * len(metrics)
    lines = [
        "% written by `pipeline report`; needs \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(latex_escape(h) for h in head) + " \\\\",
        "\\midrule",
    ]
    previous = None
    for group, x_label, n, by_metric in rows:
        if previous is not None and group != previous and x_name:
            lines.append("\\midrule")
        cells = [latex_escape(group) if group != previous or not x_name else ""]
        if x_name:
            cells.append(latex_escape(x_label))
        cells.append(str(n))
        cells += [_cell_text(by_metric.get(m), digits, "$\\pm$", n) for m in metrics]
        lines.append(" & ".join(cells) + " \\\\")
        previous = group
    lines += [
        "\\bottomrule",
        "\\end{tabular}",
        f"\\caption{{{caption}}}",
        "\\label{tab:report}",
        "\\end{table}",
    ]
    return "\n".join(lines) + "\n"


def markdown_table(rows, metrics: list[str], x_name: str | None, digits: int) -> str:
    head = ["group"] + ([x_name] if x_name else []) + ["n"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, x_label, n, by_metric in rows:
        cells = [group] + ([x_label] if x_name else []) + [str(n)]
        cells += [_cell_text(by_metric.get(m), digits, "±", n) for m in metrics]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, records: list[Record], x_name: str | None, metrics: list[str]) -> None:
    swept = [f for f in varying_fields(records) if f not in (x_name, "seed")]
    others = sorted({k for r in records for k in r.metrics} - set(metrics))
    columns = ["run_dir", "stage", "model", "group", "status", "seed"]
    columns += ([x_name] if x_name else []) + swept + metrics + others
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for r in records:
        row = [str(r.run_dir), r.stage, r.model or "", r.group, r.status, "" if r.seed is None else r.seed]
        if x_name:
            row.append("" if r.x is None else (int(r.x) if r.x == int(r.x) else r.x))
        row += ["" if r.config.get(f) is None else r.config[f] for f in swept]
        row += [repr(r.metrics[m]) if m in r.metrics else "" for m in metrics + others]
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


def figure_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", metric.replace("@", "_at_")).strip("_") + ".png"


# ------------------------------------------------------------------------------------------ figures


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
        err = [a["ci95"] or 0.0 for a in points]
        trained = [i for i, a in enumerate(points) if a["x"] != 0]
        zero = [i for i, a in enumerate(points) if a["x"] == 0]
        if trained:
            ax.errorbar(
                [pos[i] for i in trained],
                [means[i] for i in trained],
                yerr=[err[i] for i in trained],
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
                yerr=[err[i]],
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
    note = "mean ± 95% t-interval over seeds"
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
            errs.append(a["ci95"] or 0.0)
            bar_colors.append(colors[g])
            hatches.append("//" if a["before_training"] else "")
    yerr = errs if any(errs) else None
    bars = ax.bar(range(len(labels)), heights, yerr=yerr, capsize=4, color=bar_colors)
    for bar, hatch, color in zip(bars, hatches, bar_colors, strict=True):
        if hatch:
            bar.set_facecolor((*color[:3], 0.35))
            bar.set_edgecolor(color)
            bar.set_hatch(hatch)
    for i, (h, e) in enumerate(zip(heights, errs, strict=True)):
        ax.annotate(
            f"{h:.3g}",
            (i, h + e if h >= 0 else h - e),
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
    ax.set_title(f"{metric}\nmean ± 95% t-interval over seeds", fontsize=10)
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


# ------------------------------------------------------------------------------------------ baselines


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
        number = _number_or_none(value)
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


def _number_or_none(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# ------------------------------------------------------------------------------------------ stage


def collect(dirs: list[Path], exclude: list[Path], label_of) -> tuple[list[Record], dict[str, Any]]:
    """Completed records under `dirs` (labelled by `label_of`), and what was skipped."""
    files = find_run_files(dirs, exclude)
    runs: dict[Path, dict[str, Any]] = {}
    unreadable = []
    for f in files:
        data = _read_json(f)
        if data is None:
            unreadable.append(str(f))
        else:
            runs[f.parent] = data
    lookup = FieldLookup(runs)
    records: list[Record] = []
    skipped: dict[str, int] = defaultdict(int)
    for order, (run_dir, run) in enumerate(runs.items()):
        if run.get("stage") == "report":
            continue
        if run.get("status") != "completed":
            skipped[str(run.get("status"))] += 1
            continue
        for r in records_of(run, run_dir, order):
            r.group = label_of(r, lookup)
            records.append(r)
    return records, {"files": len(files), "not_completed": dict(skipped), "unreadable": unreadable}


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline report",
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders searched for run.json")
    parser.add_argument("--output_dir", default=None, help="default: RUN_DIR/report (one RUN_DIR only)")
    parser.add_argument("--x", default=None, metavar="FIELD", help="swept field for the x-axis: train_size")
    parser.add_argument(
        "--metrics", nargs="+", default=None, metavar="METRIC", help="default: the headline metrics found"
    )
    parser.add_argument(
        "--group_by", default="stage", metavar="FIELDS", help="stage and/or config fields (default: stage)"
    )
    parser.add_argument(
        "--baseline", nargs="+", default=[], metavar="SPEC", help="NAME=VALUE, NAME=RUN_DIR, METRIC:NAME=..."
    )
    parser.add_argument(
        "--log_x", choices=("auto", "true", "false"), default="auto", help="log2 x-axis (default: auto)"
    )
    parser.add_argument(
        "--before_point", type=_bool, default=True, metavar="BOOL", help="x = 0 from <metric>_before (true)"
    )
    parser.add_argument("--digits", type=int, default=3, help="decimals in the tables (default: 3)")
    return parser


def _natural(value: Any) -> tuple:
    number = _number_or_none(str(value))
    return (0, number, "") if number is not None else (1, 0.0, str(value))


def _producer(model_path: str, runs: dict[Path, tuple[str, int]]) -> tuple[str, int] | None:
    """(start, order) of the collected run whose folder is `model_path` (exactly, or ending with it)."""
    target = Path(model_path).resolve()
    tail = Path(os.path.normpath(model_path)).parts
    for run_dir, key in runs.items():
        resolved = run_dir.resolve()
        if resolved == target or (tail and resolved.parts[-len(tail) :] == tail and ".." not in tail):
            return key
    return None


def group_order(records: list[Record]) -> list[str]:
    """Groups in the order their stage first ran (an eval model: the run that trained it, or first when none
    of the runs did, e.g. the base model), then by their fields' values (numbers as such)."""
    trained = {r.run_dir: (r.start, r.order) for r in records if r.model is None}
    first: dict[str, tuple[str, int]] = {}
    for r in records:
        key = (r.start, r.order)
        if r.model is not None:
            key = (r.model_path and _producer(r.model_path, trained)) or ("", r.order)
        label = r.model or r.stage
        first[label] = min(first.get(label, key), key)
    keys = {
        r.group: (first[r.model or r.stage], tuple(_natural(v) for v in r.fields.values())) for r in records
    }
    return sorted(keys, key=lambda g: keys[g])


def _default_metrics(available: set[str]) -> list[str]:
    passk = sorted((m for m in available if re.fullmatch(r"pass@\d+", m)), key=lambda m: int(m[5:]))
    return passk + [m for m in HEADLINE if m in available]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.digits < 0:
        raise PipelineError(f"--digits must be >= 0, got {args.digits}")
    dirs = [Path(d) for d in args.run_dirs]
    for d in dirs:
        if not d.exists():
            raise PipelineError(f"RUN_DIR not found: '{d}'")
    if args.output_dir is None and len(dirs) > 1:
        raise PipelineError("--output_dir is required with more than one RUN_DIR")
    output_dir = (
        Path(args.output_dir)
        if args.output_dir
        else (dirs[0] if dirs[0].is_dir() else dirs[0].parent) / "report"
    )
    outputs.check_ours(output_dir, "report")  # before the runs are read: a wrong folder is said at once
    group_fields = [f.strip() for f in args.group_by.split(",") if f.strip()] or ["stage"]

    def label_of(r: Record, lookup: FieldLookup) -> str:
        parts = [] if "stage" in group_fields or r.model is None else [r.model]
        for f in group_fields:
            if f == "stage":
                parts.append(r.model or r.stage)
            else:
                value = lookup.get(r.run_dir, f)
                r.fields[f] = value
                parts.append(f"{f}={value}")
        if args.x:
            r.x = _x_value(lookup.get(r.run_dir, args.x), args.x, r.run_dir)
        return ", ".join(parts)

    baseline_dirs = [Path(parse_baseline(s)[2]) for s in args.baseline]
    exclude = [output_dir] + [p for p in baseline_dirs if p.is_dir()]
    records, skipped = collect(dirs, exclude, label_of)
    if not skipped["files"]:
        raise PipelineError(f"no {RUN_FILE} found under {', '.join(str(d) for d in dirs)}")
    if not records:
        raise PipelineError(
            f"no completed run among the {skipped['files']} {RUN_FILE} files found "
            f"(status: {', '.join(f'{k}: {v}' for k, v in skipped['not_completed'].items()) or 'unreadable'})"
        )
    available = {k for r in records for k in r.metrics}
    metrics = args.metrics or _default_metrics(available)
    if not metrics:
        raise PipelineError(
            "none of the headline metrics (pass@k, " + ", ".join(HEADLINE) + ") is in the runs; "
            f"name some with --metrics (found: {', '.join(sorted(available)) or 'no metrics'})"
        )
    for m in metrics:
        if m not in available:
            close = difflib.get_close_matches(m, available, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise PipelineError(
                f"metric '{m}' is in no completed run{hint} (metrics found: {', '.join(sorted(available))})"
            )
    use_x = args.x is not None
    plotted = records
    if use_x:
        plotted = [r for r in records if r.x is not None]
        if not plotted:
            raise PipelineError(
                f"--x {args.x}: no run has that field (looked in sweep, config, run.json, folder names); "
                f"fields that vary across the runs: {', '.join(varying_fields(records)) or 'none'}"
            )
    baselines = resolve_baselines(args.baseline, metrics, label_of)

    groups = group_order(plotted)
    aggs = aggregate(plotted, metrics, groups, use_x, args.before_point)
    _warn_repeated_seeds(aggs, plotted, args.x)

    outputs.claim(output_dir, "report")
    csv_path = output_dir / "runs.csv"
    write_csv(csv_path, records, args.x, metrics)
    figures = []
    for m in metrics:
        cells = [a for a in aggs if a["metric"] == m]
        if not cells:
            continue
        path = output_dir / figure_name(m)
        if use_x:
            draw_lines(path, m, cells, groups, args.x, args.log_x, baselines)
        else:
            draw_bars(path, m, cells, groups, baselines)
        figures.append(path)

    rows = table_rows(aggs, metrics, groups, use_x)
    caption = "Mean ± half-width of the 95% Student-t interval over seeds (n runs; one run: its value)."
    latex_caption = (
        "Mean $\\pm$ half-width of the 95\\% Student-t interval over seeds ($n$ runs; one run: its value)."
    )
    if any(a["before_training"] for a in aggs):
        caption += " before: the starting model, from the runs' `<metric>_before` values."
        latex_caption += " before: the starting model, from the runs' \\texttt{<metric>\\_before} values."
    table_path = output_dir / "table.tex"
    atomic_write_text(table_path, latex_table(rows, metrics, args.x, args.digits, latex_caption))
    summary_path = output_dir / "summary.md"
    md = markdown_table(rows, metrics, args.x, args.digits)
    without_x = len(records) - len(plotted)
    text = _summary(dirs, records, skipped, without_x, args.x, md, caption, figures, baselines)
    atomic_write_text(summary_path, text)
    result = {
        "output_dir": str(output_dir),
        "runs": len({r.run_dir for r in records}),
        "records": len(records),
        "skipped": skipped["not_completed"],
        "unreadable": skipped["unreadable"],
        "without_x": len(records) - len(plotted),
        "x": args.x,
        "metrics": metrics,
        "groups": groups,
        "baselines": {b.name: b.values for b in baselines},
        "aggregates": aggs,
        "csv": str(csv_path),
        "figures": [str(p) for p in figures],
        "table": str(table_path),
        "summary": str(summary_path),
    }
    atomic_write_text(output_dir / "report.json", json.dumps(result, indent=2) + "\n")
    _print_result(result, skipped)
    return result


def _warn_repeated_seeds(aggs, records: list[Record], x_name: str | None) -> None:
    for a in aggs:
        seeds = [s for s in a["seeds"] if s is not None]
        if a["before_training"] or len(seeds) == len(set(seeds)):
            continue
        cell = [r for r in records if r.group == a["group"] and r.x == a["x"] and a["metric"] in r.metrics]
        differ = [f for f in varying_fields(cell) if f not in ("seed", x_name)]
        if not differ:  # nothing else differs: replicates whose seed lives upstream (e.g. an eval stage)
            continue
        where = f"group '{a['group']}'" + (f" at {x_name}={fmt_x(a['x'])}" if x_name else "")
        print(
            f"pipeline report: warning: {where} has several runs with the same seed for {a['metric']}"
            + f"; they differ in {', '.join(differ)} (split them with --x or --group_by)",
            file=sys.stderr,
        )


def _summary(dirs, records, skipped, without_x, x_name, md_table, caption, figures, baselines) -> str:
    lines = ["# Report", ""]
    runs = len({r.run_dir for r in records})
    lines.append(f"{runs} completed runs ({len(records)} records) under {', '.join(f'`{d}`' for d in dirs)}.")
    if skipped["not_completed"]:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(skipped["not_completed"].items()))
        lines.append(f"Skipped {sum(skipped['not_completed'].values())} runs not completed ({counts}).")
    if skipped["unreadable"]:
        lines.append(f"Unreadable run.json files: {', '.join(skipped['unreadable'])}.")
    if without_x:
        lines.append(f"{without_x} records without `{x_name}` are in runs.csv only.")
    lines += ["", caption, "", md_table]
    if baselines:
        lines.append(
            "Baselines: "
            + "; ".join(
                f"{b.name}: " + ", ".join(f"{m} = {v:.4g}" for m, v in b.values.items()) for b in baselines
            )
            + "."
        )
        lines.append("")
    lines += ["## Figures", ""]
    lines += [f"- `{p.name}`\n\n  ![{p.stem}]({p.name})" for p in figures]
    lines += [
        "",
        "## Files",
        "",
        "- `runs.csv`: one row per run (an eval run: per model), every metric",
        "- `table.tex`: the table above (booktabs)",
        "- `report.json`: every aggregate with its values",
        "",
    ]
    return "\n".join(lines)


def _print_result(result: dict[str, Any], skipped: dict[str, Any]) -> None:
    note = ""
    if skipped["not_completed"]:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(skipped["not_completed"].items()))
        note = f"; skipped {sum(skipped['not_completed'].values())} not completed ({counts})"
    if skipped["unreadable"]:
        note += f"; {len(skipped['unreadable'])} unreadable run.json"
    print(f"report: {result['runs']} completed runs, {result['records']} records{note}")
    print(f"report: csv: {result['csv']}")
    for path in result["figures"]:
        print(f"report: figure: {path}")
    print(f"report: table: {result['table']}")
    print(f"report: summary: {result['summary']}")


if __name__ == "__main__":
    main(sys.argv[1:])
