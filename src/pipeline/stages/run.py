"""`pipeline run`: chain stages into one resumable pipeline, and sweep it over seeds, dataset sizes, anything.

    pipeline run recipes/demo/pipeline.yaml [--dry_run] [--from STAGE] [--index I | --jobs N] [--list]

A pipeline file (YAML):

    output_dir: runs/dpo_sizes             # the root; each sweep point gets its own run directory under it
    sweep:                                 # optional: the cartesian product of these lists
      train_size: [1000, 2000, 4000]
      seed: [0, 1, 2]
    args: {seed: "${seed}"}                # optional: arguments every stage gets (its own win)
    stages:
      - name: sft                          # unique; the stage's output_dir defaults to <run dir>/<name>
        stage: sft                         # any `pipeline` stage
        recipe: recipes/demo/sft.yaml      # optional: the stage's YAML recipe ...
        args: {max_steps: 100}             # ... and/or fields that override it
        shared: true                       # run once for all sweep points (in <root>/shared/<name>)
      - name: dpo
        stage: dpo
        recipe: recipes/demo/dpo.yaml
        args: {model_name_or_path: "${sft.output_dir}", max_train_samples: "${train_size}"}
        launch: {config_file: accelerate_configs/deepspeed_zero2.yaml, num_processes: 8}   # optional
        after: [sft]                       # optional: runs after (and reruns with) stages it does not reference

`${name.field}` is that stage's resolved argument (a stage's output becomes the next one's input);
`${field}` is a sweep value or one of the file's `vars:` (which `--set VAR=VALUE` overrides), `${run_dir}`
the point's directory, `${root}` the pipeline's output_dir. The argument `_` holds positional arguments.

**Skip / rerun.** A stage's fingerprint hashes its stage name, resolved arguments, its recipe file's
*content*, and the fingerprints of the stages it references. After a stage completes, the runner records
the fingerprint in `<run dir>/.pipeline/<name>.json`. A stage whose recorded fingerprint matches and whose
output (run.json completed, or manifest.json, or any files) is present is skipped; a changed config gives a
new fingerprint, so that stage and every stage that references it (directly or not) rerun, with their old
output removed first. A stage that failed or was killed reruns into the same output_dir, so stages that
resume from checkpoints (ppo, the TRL trainers with `resume_from_checkpoint`) pick up where they were.
`--from STAGE` reruns that stage and every later one; `--dry_run` prints the plan (and each command)
without running anything.

**Sweeps.** Every point is an independent run directory (`<root>/train_size=1000,seed=0/`) with each
stage's own `run.json`. `--list` prints the points with their index; `--index I` runs one point (a cluster
array job per point; shared stages are guarded by a file lock); `--jobs N` runs N points side by side as
subprocesses, one GPU each when GPUs are visible (`CUDA_VISIBLE_DEVICES`). Stages run in this process
(no import cost per stage) unless they have `launch:`, which runs `accelerate launch --config_file ... -m
pipeline.cli <stage> ...` in a subprocess. `pipeline_run.json` (in the root; in the point's folder with
`--index`) records what ran, what was skipped and how long each stage took.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import outputs
from pipeline.data import load_yaml
from pipeline.errors import PipelineError
from pipeline.outputs import check_name
from pipeline.redaction import redact_argv
from pipeline.runinfo import atomic_write_text

REFERENCE = re.compile(r"\$\{([A-Za-z_][\w-]*)(?:\.([A-Za-z_]\w*))?\}")
STAGE_KEYS = {"name", "stage", "recipe", "args", "shared", "launch", "after"}
PIPELINE_KEYS = {"output_dir", "vars", "sweep", "args", "stages"}
# rerun reasons whose old output must go first (an interrupted run keeps its output, to resume from)
STALE = ("config changed", "an upstream stage reruns", "output of an unknown config")


@dataclass
class StageSpec:
    name: str
    stage: str
    recipe: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    shared: bool = False
    launch: dict[str, Any] | None = None
    after: list[str] = field(default_factory=list)


@dataclass
class Pipeline:
    path: Path
    output_dir: Path
    sweep: dict[str, list]
    args: dict[str, Any]
    stages: list[StageSpec]
    variables: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ loading


def load_pipeline(
    path: str | os.PathLike, output_dir: str | None = None, overrides: dict[str, str] | None = None
) -> Pipeline:
    """Read and check a pipeline file; every problem is one line naming the file and key."""
    from pipeline.cli import STAGES

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: pipeline file not found")
    try:
        raw = load_yaml(path.read_text(), str(path)) or {}
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise PipelineError(
            f"{path}: a pipeline file is a mapping with `stages:` (and output_dir, sweep, args)"
        )
    unknown = set(raw) - PIPELINE_KEYS
    if unknown:
        raise PipelineError(
            f"{path}: unknown key '{sorted(unknown)[0]}' (use {', '.join(sorted(PIPELINE_KEYS))})"
        )
    root = output_dir or raw.get("output_dir")
    if not root:
        raise PipelineError(f"{path}: `output_dir` is required (the folder every run goes under)")
    variables = dict(raw.get("vars") or {})
    for key, value in (overrides or {}).items():
        if key not in variables:
            known = ", ".join(sorted(variables)) or "none"
            raise PipelineError(f"--set {key}: not a variable of {path} (its vars: {known})")
        variables[key] = yaml.safe_load(value)  # numbers stay numbers
    sweep = raw.get("sweep") or {}
    if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
        raise PipelineError(f"{path}: `sweep` maps each field to a non-empty list of values")
    for key, values in sweep.items():
        check_name(key, f"{path}: sweep field")
        for value in values:
            check_name(value, f"{path}: sweep value of {key}:")
    stages: list[StageSpec] = []
    for i, entry in enumerate(raw.get("stages") or []):
        where = f"{path}: stages[{i}]"
        if not isinstance(entry, dict) or "stage" not in entry:
            raise PipelineError(f"{where}: each stage is a mapping with at least `stage:` (and `name:`)")
        unknown = set(entry) - STAGE_KEYS
        if unknown:
            raise PipelineError(
                f"{where}: unknown key '{sorted(unknown)[0]}' (use {', '.join(sorted(STAGE_KEYS))})"
            )
        spec = StageSpec(
            name=str(entry.get("name") or entry["stage"]),
            stage=str(entry["stage"]),
            recipe=entry.get("recipe"),
            args=dict(entry.get("args") or {}),
            shared=bool(entry.get("shared", False)),
            launch=entry.get("launch"),
            after=list(entry.get("after") or []),
        )
        check_name(spec.name, f"{where}: stage name")
        if spec.stage not in STAGES or spec.stage in ("run", "demo"):
            raise PipelineError(f"{where}: unknown stage '{spec.stage}' (see `pipeline --help`)")
        if any(s.name == spec.name for s in stages):
            raise PipelineError(f"{where}: stage name '{spec.name}' is used twice; give each a unique `name`")
        if spec.recipe and not (path.parent / spec.recipe).is_file() and not Path(spec.recipe).is_file():
            raise PipelineError(f"{where} ({spec.name}): recipe file not found: '{spec.recipe}'")
        stages.append(spec)
    if not stages:
        raise PipelineError(f"{path}: no `stages:` listed")
    names = [s.name for s in stages]
    for i, spec in enumerate(stages):
        for ref in references(spec):
            if ref in sweep or ref in variables or ref in ("run_dir", "root"):
                if spec.shared and ref in sweep:
                    raise PipelineError(
                        f"{path}: stage '{spec.name}' is shared but uses the sweep field ${{{ref}}}"
                    )
                continue
            if ref not in names:
                raise PipelineError(f"{path}: stage '{spec.name}' refers to '${{{ref}...}}', which is no stage name "
                                    f"or sweep field")  # fmt: skip
            if names.index(ref) >= i:
                raise PipelineError(f"{path}: stage '{spec.name}' refers to '{ref}', which runs after it")
            if spec.shared and not stages[names.index(ref)].shared:
                raise PipelineError(
                    f"{path}: shared stage '{spec.name}' depends on '{ref}', which is not shared"
                )
    return Pipeline(path, Path(root), {k: list(v) for k, v in sweep.items()}, dict(raw.get("args") or {}), stages,
                    variables)  # fmt: skip


def references(spec: StageSpec) -> set[str]:
    """Names a stage refers to through `${name...}` in its arguments, plus its explicit `after:`."""
    found = set(spec.after)
    for value in spec.args.values():
        for item in value if isinstance(value, list) else [value]:
            found.update(m.group(1) for m in REFERENCE.finditer(str(item)))
    return found


def sweep_points(pipe: Pipeline) -> list[dict[str, Any]]:
    keys = list(pipe.sweep)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*pipe.sweep.values())] or [
        {}
    ]


def point_dir(pipe: Pipeline, point: dict[str, Any]) -> Path:
    if not point:
        return pipe.output_dir
    return pipe.output_dir / ",".join(f"{k}={v}" for k, v in point.items())


# ------------------------------------------------------------------------------------------------ resolving


def substitute(value: Any, variables: dict[str, Any], resolved: dict[str, dict[str, Any]], where: str) -> Any:
    """Replace `${field}` / `${stage.field}` in a value. A whole-value reference keeps its type."""
    if isinstance(value, list):
        return [substitute(v, variables, resolved, where) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match) -> Any:
        name, key = match.group(1), match.group(2)
        if key is None:
            if name not in variables:
                raise PipelineError(
                    f"{where}: ${{{name}}} is not a variable or sweep field (or run_dir/root)"
                )
            return variables[name]
        if name not in resolved:
            raise PipelineError(f"{where}: ${{{name}.{key}}}: stage '{name}' has not been resolved")
        if key not in resolved[name]:
            known = ", ".join(sorted(resolved[name]))
            raise PipelineError(
                f"{where}: ${{{name}.{key}}}: stage '{name}' has no argument '{key}' ({known})"
            )
        return resolved[name][key]

    whole = REFERENCE.fullmatch(value)
    if whole:
        return lookup(whole)
    return REFERENCE.sub(lambda m: str(lookup(m)), value)


def recipe_args(recipe: str | None, base: Path) -> tuple[dict[str, Any], str | None]:
    """(the recipe's fields, the absolute recipe path) — fields are needed so `${stage.field}` can read them."""
    if not recipe:
        return {}, None
    path = Path(recipe) if Path(recipe).is_file() else base / recipe
    data = load_yaml(path.read_text(), str(path)) or {}
    data.pop("env", None)
    return data, str(path.resolve())


def argv_of(args: dict[str, Any]) -> list[str]:
    """Stage arguments as command-line flags: lists space-separated, booleans as true/false, None left out;
    the key `_` holds positional arguments (e.g. `pipeline report`'s run folders)."""
    positional = args.get("_") or []
    argv: list[str] = [str(v) for v in (positional if isinstance(positional, list) else [positional])]
    for key, value in args.items():
        if value is None or key == "_":
            continue
        argv.append(f"--{key}")
        if isinstance(value, list):
            argv.extend(str(v) for v in value)
        elif isinstance(value, bool):
            argv.append("true" if value else "false")
        else:
            argv.append(str(value))
    return argv


@dataclass
class PlannedStage:
    spec: StageSpec
    run_dir: Path
    args: dict[str, Any]  # pipeline-level + stage args, substituted; recipe fields are read from the recipe
    recipe_path: str | None
    fingerprint: str
    action: str = "run"  # run | skip
    reason: str = ""

    @property
    def output_dir(self) -> Path:
        return Path(self.args["output_dir"])

    def argv(self) -> list[str]:
        return (["--config", self.recipe_path] if self.recipe_path else []) + argv_of(self.args)


def plan_point(pipe: Pipeline, point: dict[str, Any], force_from: str | None) -> list[PlannedStage]:
    """Resolve every stage of one sweep point and decide run or skip."""
    run_dir = point_dir(pipe, point)
    shared_dir = pipe.output_dir / "shared" if pipe.sweep else pipe.output_dir
    variables = {**pipe.variables, **point, "run_dir": str(run_dir), "root": str(pipe.output_dir)}
    resolved: dict[str, dict[str, Any]] = {}
    fingerprints: dict[str, str] = {}
    changed: set[str] = set()
    planned = []
    forcing = False
    for spec in pipe.stages:
        where = f"{pipe.path}: stage '{spec.name}'"
        home = shared_dir if spec.shared else run_dir
        fields, recipe_path = recipe_args(spec.recipe, pipe.path.parent)
        args = {k: substitute(v, variables, resolved, where) for k, v in {**pipe.args, **spec.args}.items()}
        args.setdefault("output_dir", str(home / spec.name))
        resolved[spec.name] = {**fields, **args}
        recipe_text = Path(recipe_path).read_text() if recipe_path else ""
        deps = sorted(references(spec) & set(fingerprints))
        digest = hashlib.sha256(
            json.dumps([spec.stage, args, recipe_text, [fingerprints[d] for d in deps]], sort_keys=True, default=str)
            .encode()
        ).hexdigest()[:16]  # fmt: skip
        fingerprints[spec.name] = digest
        stage = PlannedStage(spec, home, args, recipe_path, digest)
        forcing = forcing or spec.name == force_from
        marker = read_marker(home, spec.name)
        if forcing:
            stage.reason = f"--from {force_from}"
        elif marker is None and output_complete(stage.output_dir):
            stage.reason = "output of an unknown config"
        elif marker is None:
            stage.reason = "not run yet" if not stage.output_dir.exists() else "incomplete"
        elif any(d in changed for d in deps):
            stage.reason = "an upstream stage reruns"
        elif marker.get("fingerprint") != digest:
            stage.reason = "config changed"
        elif not output_complete(stage.output_dir):
            stage.reason = "output missing"
        else:
            stage.action, stage.reason = "skip", "complete, config unchanged"
        if stage.action == "run":
            changed.add(spec.name)
        planned.append(stage)
    if force_from is not None and not any(s.spec.name == force_from for s in planned):
        raise PipelineError(
            f"--from: no stage named '{force_from}' ({', '.join(s.spec.name for s in planned)})"
        )
    return planned


def marker_path(home: Path, name: str) -> Path:
    return home / ".pipeline" / f"{name}.json"


def read_marker(home: Path, name: str) -> dict | None:
    try:
        return json.loads(marker_path(home, name).read_text())
    except (OSError, ValueError):
        return None


def output_complete(output_dir: Path) -> bool:
    """A stage's output is there: its run.json says completed, or a manifest.json, or (stages that write
    neither, e.g. tiny-model, synthetic-data) any files at all."""
    if not output_dir.is_dir():
        return False
    run_file = output_dir / "run.json"
    if run_file.is_file():
        try:
            return json.loads(run_file.read_text()).get("status") == "completed"
        except ValueError:
            return False
    return (output_dir / "manifest.json").is_file() or any(output_dir.iterdir())


# ------------------------------------------------------------------------------------------------ running


@contextmanager
def file_lock(path: Path):
    """Exclusive lock across processes (shared stages of array jobs started together)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_stage(stage: PlannedStage, log) -> float:
    """Run one stage (in-process, or via accelerate launch) and record its marker; returns seconds."""
    from pipeline.cli import run_stage as run_in_process

    marker = marker_path(stage.run_dir, stage.spec.name)
    if stage.reason in STALE or stage.reason.startswith("--from"):
        # stale output (and checkpoints) must not be resumed: set aside (only the stage's own output, never
        # a folder holding its inputs), deleted once the new output is complete
        try:
            aside = outputs.set_aside(stage.output_dir, stage.spec.stage, input_paths(stage.args))
        except PipelineError as err:
            raise PipelineError(f"stage '{stage.spec.name}': {err}") from None
        if aside is not None:
            log(f"[{stage.spec.name}] previous output set aside as {aside.name} until this stage completes")
    marker.unlink(missing_ok=True)
    started = time.time()
    log(
        f"[{stage.spec.name}] {stage.reason}: pipeline {stage.spec.stage} {' '.join(redact_argv(stage.argv()))}"
    )
    if stage.spec.launch:
        result = subprocess.run(launch_command(stage), check=False)
        if result.returncode != 0:
            raise PipelineError(
                f"stage '{stage.spec.name}' failed (exit {result.returncode}); see its run.log"
            )
    else:
        run_in_process(stage.spec.stage, stage.argv())
    seconds = time.time() - started
    outputs.drop_set_aside(stage.output_dir, stage.spec.stage)
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"fingerprint": stage.fingerprint, "seconds": seconds,
                                          "stage": stage.spec.stage, "argv": redact_argv(stage.argv())}, indent=2))  # fmt: skip
    return seconds


def input_paths(args: dict[str, Any]) -> list[str]:
    """The stage's arguments that name existing files or folders (other than its output_dir)."""
    found = []
    for key, value in args.items():
        for item in value if isinstance(value, list) else [value]:
            if key != "output_dir" and isinstance(item, str) and item and os.path.exists(item):
                found.append(item)
    return found


def launch_command(stage: PlannedStage) -> list[str]:
    launch = dict(stage.spec.launch or {})
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    for key, value in launch.items():
        command += [f"--{key}", str(value)]
    return command + ["-m", "pipeline.cli", stage.spec.stage, *stage.argv()]


def run_point(pipe: Pipeline, point: dict, force_from: str | None, dry_run: bool, log) -> list[dict]:
    planned = plan_point(pipe, point, force_from)
    records = []
    for stage in planned:
        if dry_run or stage.action == "skip":
            log(f"[{stage.spec.name}] {stage.action}: {stage.reason}" + ("" if stage.action == "skip" else
                f"\n    pipeline {stage.spec.stage} {' '.join(redact_argv(stage.argv()))}"))  # fmt: skip
            records.append({"stage": stage.spec.name, "action": stage.action, "reason": stage.reason})
            continue
        if stage.spec.shared:
            with file_lock(stage.run_dir / ".pipeline" / "shared.lock"):
                again = {s.spec.name: s for s in plan_point(pipe, point, None)}
                if again[stage.spec.name].action == "skip" and stage.reason != f"--from {force_from}":
                    records.append(
                        {"stage": stage.spec.name, "action": "skip", "reason": "done by another job"}
                    )
                    continue
                seconds = run_stage(stage, log)
        else:
            seconds = run_stage(stage, log)
        records.append(
            {"stage": stage.spec.name, "action": "ran", "reason": stage.reason, "seconds": seconds}
        )
    return records


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="pipeline run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))  # fmt: skip
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
        atomic_write_text(where / "pipeline_run.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def run_jobs(args, selected: list[int], log) -> dict:
    """`--jobs N`: each point as `pipeline run FILE --index I`, N at a time, one GPU each if any."""
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        gpus = 0
    pending, running, results = list(selected), [], {}
    while pending or running:
        while pending and len(running) < args.jobs:
            index = pending.pop(0)
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
            command = [sys.executable, "-m", "pipeline.cli", "run", args.pipeline, "--index", str(index)]
            if args.output_dir:
                command += ["--output_dir", args.output_dir]
            if args.from_stage:
                command += ["--from", args.from_stage]
            for item in args.set:
                command += ["--set", item]
            log(f"== point {index}: started ({' '.join(command[2:])})")
            running.append((index, subprocess.Popen(command, env=env)))
        time.sleep(0.5)
        for index, proc in list(running):
            if proc.poll() is not None:
                running.remove((index, proc))
                results[str(index)] = {"exit": proc.returncode}
                log(f"== point {index}: exit {proc.returncode}")
    failed = [i for i, r in results.items() if r["exit"] != 0]
    if failed:
        raise PipelineError(f"sweep points {', '.join(failed)} failed; rerun them with --index (they resume)")
    return results
