"""Each stage of a sweep point resolved (references substituted, fingerprinted) and decided: run or skip."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data import load_yaml
from pipeline.errors import PipelineError
from pipeline.stages.run.placeholders import REFERENCE
from pipeline.stages.run.spec import Pipeline, StageSpec, point_dir, references

# rerun reasons whose old output must go first (an interrupted run keeps its output, to resume from)
STALE = ("config changed", "an upstream stage reruns", "output of an unknown config")


def substitute(value: Any, variables: dict[str, Any], resolved: dict[str, dict[str, Any]], where: str) -> Any:
    """Replace `${field}` / `${stage.field}` in a value. A whole-value reference keeps its type."""
    if isinstance(value, list):
        return [substitute(v, variables, resolved, where) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match) -> Any:
        name, key = match.group(1), match.group(2)
        if name == "env" and key is not None:  # the node's environment, e.g. ${env.NODE_RANK}
            if key not in os.environ:
                raise PipelineError(f"{where}: ${{env.{key}}}: the environment variable {key} is not set")
            return os.environ[key]
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
    launch: dict[str, Any] | None = None  # the spec's launch settings, substituted on this node

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
        args.setdefault("output_dir", str(home / (spec.folder or spec.name)))
        resolved[spec.name] = {**fields, **args}
        recipe_text = Path(recipe_path).read_text() if recipe_path else ""
        deps = sorted(references(spec) & set(fingerprints))
        digest = hashlib.sha256(
            json.dumps([spec.stage, args, recipe_text, [fingerprints[d] for d in deps]], sort_keys=True, default=str)
            .encode()
        ).hexdigest()[:16]  # fmt: skip
        fingerprints[spec.name] = digest
        launch = None
        if spec.launch:
            launch = {
                k: substitute(v, variables, resolved, f"{where} launch") for k, v in spec.launch.items()
            }
        stage = PlannedStage(spec, home, args, recipe_path, digest, launch=launch)
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
