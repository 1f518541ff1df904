"""`pipeline run`: read the pipeline file → plan each sweep point → run or skip each stage → record. The
stage's documentation is the package's (`pipeline.stages.run`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeline import outputs
from pipeline.errors import PipelineError
from pipeline.runinfo import atomic_write_text
from pipeline.stages.run.execute import node_rank, run_jobs, run_point
from pipeline.stages.run.spec import Pipeline, load_pipeline, point_dir, sweep_points

# ------------------------------------------------------------------------------------------------ loading


# ------------------------------------------------------------------------------------------------ resolving


# ------------------------------------------------------------------------------------------------ running


def _stage_doc() -> str:
    """The stage's documentation: the package's docstring (--help shows it)."""
    import importlib

    return importlib.import_module("pipeline.stages.run").__doc__ or ""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="pipeline run", description=_stage_doc().split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(_stage_doc().split("\n\n")[1:]))  # fmt: skip
    parser.add_argument("pipeline", help="the pipeline YAML file")
    parser.add_argument("--output_dir", help="override the file's output_dir")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument(
        "--from", dest="from_stage", metavar="STAGE", help="rerun this stage and every later one"
    )
    parser.add_argument("--index", type=int, help="run only sweep point I (see --list)")
    parser.add_argument("--jobs", type=int, default=1, help="run N sweep points side by side (subprocesses)")
    parser.add_argument("--list", action="store_true", help="print the sweep points with their index")
    parser.add_argument("--set", action="append", default=[], metavar="VAR=VALUE",
                        help="override one of the file's `vars:` (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise PipelineError(f"--set {item}: expected VAR=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    pipe = load_pipeline(args.pipeline, args.output_dir, overrides)
    points = sweep_points(pipe)

    def log(message: str) -> None:
        print(message, flush=True)

    if args.list:
        for i, point in enumerate(points):
            print(f"{i}\t{point_dir(pipe, point)}")
        return {"points": points}
    if args.index is not None and not 0 <= args.index < len(points):
        raise PipelineError(
            f"--index {args.index}: the sweep has {len(points)} points (0..{len(points) - 1})"
        )
    selected = [args.index] if args.index is not None else list(range(len(points)))
    if not args.dry_run:  # the root holds the runner's records: a folder of other files is refused
        outputs.claim(pipe.output_dir, "run")
    summary: dict[str, Any] = {"pipeline": str(pipe.path), "points": {}}
    if args.jobs > 1 and len(selected) > 1 and not args.dry_run:
        # shared stages once, here; then one subprocess per point, at most `jobs` at a time
        first = points[selected[0]]
        shared_only = Pipeline(pipe.path, pipe.output_dir, pipe.sweep, pipe.args, [s for s in pipe.stages if s.shared],
                               pipe.variables)  # fmt: skip
        if shared_only.stages:
            run_point(shared_only, first, args.from_stage if args.from_stage in [s.name for s in shared_only.stages]
                      else None, False, log)  # fmt: skip
        summary["points"] = run_jobs(args, selected, log)
    else:
        for i in selected:
            log(f"== point {i}: {point_dir(pipe, points[i])}")
            summary["points"][str(i)] = run_point(pipe, points[i], args.from_stage, args.dry_run, log)
    if not args.dry_run:  # one point's job writes its own record, so array jobs never overwrite each other
        where = point_dir(pipe, points[args.index]) if args.index is not None else pipe.output_dir
        where.mkdir(parents=True, exist_ok=True)
        node = node_rank()  # each node of a multi-node run keeps its own record
        name = "pipeline_run.json" if node == 0 else f"pipeline_run.node{node}.json"
        atomic_write_text(where / name, json.dumps(summary, indent=2, default=str) + "\n")
    return summary
