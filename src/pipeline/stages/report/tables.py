"""Aggregates over seeds (mean and 95% interval per group and x) and the tables: Markdown, LaTeX, CSV.

A point of several runs: Student's t over its seeds (a `*_before` point: each seed's values averaged first,
since every size of a sweep logs the same starting model). A point of one run: the run's own 95% interval
over its prompts where it logged one (Wilson for 0/1 metrics, else bootstrap), else no interval."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.runinfo import atomic_write_text
from pipeline.stages.report.collect import Record, varying_fields
from pipeline.stats import mean_ci, per_seed_means

T_OVER_SEEDS = "t over seeds"


@dataclass
class Cell:
    group: str
    x: float | None
    metric: str
    values: list[float]
    seeds: list[Any]
    before: bool = False  # from `<metric>_before`: the zero-training point
    records: list[Record] | None = None  # the runs behind the values (their own intervals)

    def summary(self) -> dict[str, Any]:
        values, seeds = per_seed_means(self.values, self.seeds) if self.before else (self.values, self.seeds)
        mean, half = mean_ci(values)
        out = {"group": self.group, "x": self.x, "metric": self.metric, "before_training": self.before,
               "n": len(values), "mean": mean, "ci95": half, "ci_low": None, "ci_high": None,
               "interval": None, "n_prompts": None, "values": values, "seeds": seeds,
               "measurements": len(self.values)}  # fmt: skip
        if half is not None:
            out.update(ci_low=mean - half, ci_high=mean + half, interval=T_OVER_SEEDS)
        elif len(self.values) == 1 and self.records:
            out.update(_run_interval(self.records[0], self.metric + ("_before" if self.before else "")))
        return out


def _run_interval(record: Record, name: str) -> dict[str, Any]:
    """A single run's own 95% interval over its prompts, when it logged one."""
    low, high = record.metrics.get(f"{name}_ci_low"), record.metrics.get(f"{name}_ci_high")
    method = record.intervals.get(name)
    if low is None or high is None or method is None:
        return {}
    n = record.metrics.get(f"{name}_n", record.metrics.get("num_prompts"))
    return {"ci_low": low, "ci_high": high, "interval": f"{method} over prompts",
            "n_prompts": None if n is None else int(n)}  # fmt: skip


def interval_note(aggs: list[dict[str, Any]]) -> str:
    """What the error bars of these points are, and over how many: for figure titles and captions."""
    ns = sorted({a["n"] for a in aggs if a["interval"] == T_OVER_SEEDS})
    parts = []
    if ns:
        count = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
        parts.append(f"mean ± 95% t-interval over seeds (n = {count} per point)")
    within = sorted({(a["interval"], a["n_prompts"]) for a in aggs if a["interval"] not in (None, T_OVER_SEEDS)},
                    key=str)  # fmt: skip
    for method, n in within:
        kind = method.replace(" over prompts", "")
        kind = {"wilson": "Wilson", "bootstrap": "bootstrap"}.get(kind, kind)
        over = f"{n} prompts" if n else "its prompts"
        parts.append(f"one run per point: its 95% {kind} interval over {over}")
    if any(a["interval"] is None for a in aggs):
        parts.append("one run" + (" for some points" if parts else " per point") + ": no interval")
    return "; ".join(parts)


def aggregate(
    records: list[Record], metrics: list[str], groups: list[str], use_x: bool, before_point: bool
) -> list[dict[str, Any]]:
    cells: dict[tuple, Cell] = {}
    for r in records:
        for m in metrics:
            if m in r.metrics:
                cell = cells.setdefault((r.group, r.x, m, False), Cell(r.group, r.x, m, [], [], records=[]))
                cell.values.append(r.metrics[m])
                cell.seeds.append(r.seed)
                cell.records.append(r)
    if before_point:
        for r in records:
            for m in metrics:
                has_zero = use_x and (r.group, 0.0, m, False) in cells
                if f"{m}_before" in r.metrics and (r.group, r.x, m, False) in cells and not has_zero:
                    x0 = 0.0 if use_x else None
                    cell = cells.setdefault((r.group, x0, m, True), Cell(r.group, x0, m, [], [], True, []))
                    cell.values.append(r.metrics[f"{m}_before"])
                    cell.seeds.append(r.seed)
                    cell.records.append(r)
    rank = {g: i for i, g in enumerate(groups)}

    def key(c: Cell):
        return (metrics.index(c.metric), rank[c.group], -1 if c.x is None else c.x, not c.before)

    return [c.summary() for c in sorted(cells.values(), key=key)]


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
    elif agg["ci_low"] is not None:  # one run's own (asymmetric) interval over its prompts
        text += f" [{_fmt(agg['ci_low'], digits)}, {_fmt(agg['ci_high'], digits)}]"
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
