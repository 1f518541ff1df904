"""`pipeline report`: collect runs → aggregate over seeds → tables and figures → summary. The stage's
documentation is the package's (`pipeline.stages.report`)."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

from pipeline import outputs
from pipeline.errors import PipelineError
from pipeline.runinfo import RUN_FILE, atomic_write_text
from pipeline.stages.report.collect import (
    HEADLINE,
    FieldLookup,
    Record,
    collect,
    default_metrics,
    group_order,
    varying_fields,
    x_value,
)
from pipeline.stages.report.figures import (
    draw_bars,
    draw_lines,
    figure_name,
    parse_baseline,
    resolve_baselines,
)
from pipeline.stages.report.matching import matching_lines, prompt_matching
from pipeline.stages.report.tables import (
    T_OVER_SEEDS,
    aggregate,
    fmt_x,
    latex_escape,
    latex_table,
    markdown_table,
    table_rows,
    write_csv,
)

# ------------------------------------------------------------------------------------------ statistics


# ------------------------------------------------------------------------------------------ collection


# ------------------------------------------------------------------------------------------ aggregation


# ------------------------------------------------------------------------------------------ formatting


# ------------------------------------------------------------------------------------------ figures


# ------------------------------------------------------------------------------------------ baselines


# ------------------------------------------------------------------------------------------ stage


def _stage_doc() -> str:
    """The stage's documentation: the package's docstring (--help shows it)."""
    import importlib

    return importlib.import_module("pipeline.stages.report").__doc__ or ""


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline report",
        description=_stage_doc().split("\n\n")[0],
        epilog="examples:\n" + _stage_doc().split("\n\n", 1)[1],
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


def output_dir_of(args, dirs: list[Path]) -> Path:
    if args.digits < 0:
        raise PipelineError(f"--digits must be >= 0, got {args.digits}")
    for d in dirs:
        if not d.exists():
            raise PipelineError(f"RUN_DIR not found: '{d}'")
    if args.output_dir is None and len(dirs) > 1:
        raise PipelineError("--output_dir is required with more than one RUN_DIR")
    return (
        Path(args.output_dir)
        if args.output_dir
        else (dirs[0] if dirs[0].is_dir() else dirs[0].parent) / "report"
    )


def labeller(args):
    """`label_of(record, lookup)`: the record's group label from `--group_by` (setting its x from `--x`)."""
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
            r.x = x_value(lookup.get(r.run_dir, args.x), args.x, r.run_dir)
        return ", ".join(parts)

    return label_of


def chosen_metrics(args, records: list[Record]) -> list[str]:
    """`--metrics`, or the headline metrics the runs have; each must be in some completed run."""
    available = {k for r in records for k in r.metrics}
    metrics = args.metrics or default_metrics(available)
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
    return metrics


def draw_figures(output_dir: Path, args, metrics, aggs, groups, baselines) -> list[Path]:
    figures = []
    for m in metrics:
        cells = [a for a in aggs if a["metric"] == m]
        if not cells:
            continue
        path = output_dir / figure_name(m)
        if args.x is not None:
            draw_lines(path, m, cells, groups, args.x, args.log_x, baselines)
        else:
            draw_bars(path, m, cells, groups, baselines)
        figures.append(path)
    return figures


def table_captions(aggs) -> tuple[str, str]:
    """(Markdown caption, LaTeX caption) of the tables."""
    methods = {a["interval"] for a in aggs}
    parts = []
    if T_OVER_SEEDS in methods:
        parts.append("Mean ± half-width of the 95% Student-t interval over seeds (n: runs, one per seed).")
    for method, text in (("wilson over prompts", "Wilson score interval (0/1 per prompt)"),
                         ("bootstrap over prompts", "percentile bootstrap interval")):  # fmt: skip
        if method in methods:
            ns = sorted({a["n_prompts"] for a in aggs if a["interval"] == method and a["n_prompts"]})
            over = f"its {', '.join(map(str, ns))} prompts" if ns else "its prompts"
            parts.append(f"[low, high]: a single run's own 95% {text} over {over}.")
    if None in methods:
        parts.append("A value alone: one run, no interval.")
    if any(a["before_training"] for a in aggs):
        parts.append("before: the starting model, from the runs' `<metric>_before` values, averaged per "
                     "seed before the interval (n: seeds).")  # fmt: skip
    caption = " ".join(parts)
    latex_caption = latex_escape(caption).replace("±", "$\\pm$").replace("`", "")
    return caption, latex_caption


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    dirs = [Path(d) for d in args.run_dirs]
    output_dir = output_dir_of(args, dirs)
    outputs.check_ours(output_dir, "report")  # before the runs are read: a wrong folder is said at once
    label_of = labeller(args)
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
    metrics = chosen_metrics(args, records)
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
    matching = prompt_matching(plotted, groups, args.x)
    _warn_repeated_seeds(aggs, plotted, args.x)

    outputs.claim(output_dir, "report")
    csv_path = output_dir / "runs.csv"
    write_csv(csv_path, records, args.x, metrics)
    figures = draw_figures(output_dir, args, metrics, aggs, groups, baselines)
    rows = table_rows(aggs, metrics, groups, use_x)
    caption, latex_caption = table_captions(aggs)
    table_path = output_dir / "table.tex"
    atomic_write_text(table_path, latex_table(rows, metrics, args.x, args.digits, latex_caption))
    summary_path = output_dir / "summary.md"
    md = markdown_table(rows, metrics, args.x, args.digits)
    text = _summary(
        dirs, records, skipped, len(records) - len(plotted), args.x, md, caption, figures, baselines
    )
    if matching:
        section = ["## Prompt matching", "", "From the `pipeline subset` manifests (`prompt_ids`) of the runs' "
                   "training data:", "", *matching_lines(matching), "", ""]  # fmt: skip
        text = text.replace("## Figures", "\n".join(section) + "## Figures", 1)
    atomic_write_text(summary_path, text)
    result = {
        "output_dir": str(output_dir), "runs": len({r.run_dir for r in records}), "records": len(records),
        "skipped": skipped["not_completed"], "unreadable": skipped["unreadable"],
        "without_x": len(records) - len(plotted), "x": args.x, "metrics": metrics, "groups": groups,
        "baselines": {b.name: b.values for b in baselines}, "aggregates": aggs, "csv": str(csv_path),
        "prompt_matching": matching,
        "figures": [str(p) for p in figures], "table": str(table_path), "summary": str(summary_path),
    }  # fmt: skip
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
