"""A pipeline file read and checked: stages, sweep, vars; the run directory of each sweep point."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.data import load_yaml
from pipeline.errors import PipelineError
from pipeline.outputs import check_name
from pipeline.stages.run.placeholders import REFERENCE
from pipeline.stages.run.rounds import splice_rounds, unroll

STAGE_KEYS = {"name", "stage", "recipe", "args", "shared", "launch", "after"}


PIPELINE_KEYS = {"output_dir", "vars", "sweep", "args", "stages"}


@dataclass
class StageSpec:
    name: str
    stage: str
    recipe: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    shared: bool = False
    launch: dict[str, Any] | None = None
    after: list[str] = field(default_factory=list)
    folder: str | None = None  # under the run directory; default: the name (a round's: round_<k>/<name>)


@dataclass
class Pipeline:
    path: Path
    output_dir: Path
    sweep: dict[str, list]
    args: dict[str, Any]
    stages: list[StageSpec]
    variables: dict[str, Any] = field(default_factory=dict)


def load_pipeline(
    path: str | os.PathLike, output_dir: str | None = None, overrides: dict[str, str] | None = None
) -> Pipeline:
    """Read and check a pipeline file; every problem is one line naming the file and key."""
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
    stages = _read_stages(path, raw.get("stages") or [], variables)
    _check_references(path, stages, sweep, variables)
    return Pipeline(path, Path(root), {k: list(v) for k, v in sweep.items()}, dict(raw.get("args") or {}), stages,
                    variables)  # fmt: skip


def _read_stage(path: Path, entry: Any, where: str) -> StageSpec:
    """One stage entry checked: known keys, a known stage, a valid name, its recipe found."""
    from pipeline.cli import STAGES

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
    if spec.recipe and not (path.parent / spec.recipe).is_file() and not Path(spec.recipe).is_file():
        raise PipelineError(f"{where} ({spec.name}): recipe file not found: '{spec.recipe}'")
    return spec


def _read_stages(path: Path, entries: list, variables: dict[str, Any]) -> list[StageSpec]:
    """The `stages:` list, each entry checked, `rounds:` blocks unrolled (`pipeline.stages.run.rounds`)."""
    stages: list[StageSpec] = []
    after_block = None
    for i, entry in enumerate(entries):
        where = f"{path}: stages[{i}]"
        if isinstance(entry, dict) and "rounds" in entry:
            specs, after_block = unroll(entry, variables, where, lambda e, w: _read_stage(path, e, w))
        else:
            spec = _read_stage(path, entry, where)
            spec.args = {k: splice_rounds(v, after_block) for k, v in spec.args.items()}
            specs = [spec]
        for spec in specs:
            if any(s.name == spec.name for s in stages):
                raise PipelineError(
                    f"{where}: stage name '{spec.name}' is used twice; give each a unique `name`"
                )
            stages.append(spec)
    if not stages:
        raise PipelineError(f"{path}: no `stages:` listed")
    return stages


def _check_references(path: Path, stages: list[StageSpec], sweep: dict, variables: dict) -> None:
    """Every `${name}` names a sweep field, a variable, or a stage that runs earlier (shared stages only
    on shared stages)."""
    names = [s.name for s in stages]
    for i, spec in enumerate(stages):
        for ref in references(spec):
            if ref in sweep or ref in variables or ref in ("run_dir", "root", "env"):
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
