"""Collecting runs: every run.json under the folders given, one record per run (or per model of an eval run)."""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.runinfo import RUN_FILE

HEADLINE = ("eval_reward", "reward", "win_rate", "eval_accuracy", "eval_loss")


# config fields that differ between every run without being a swept setting
_NOT_SWEPT = {"output_dir", "run_name", "logging_dir", "hub_model_id", "answers_cache", "config"}


_PRUNE_DIRS = {"wandb", "answers", "__pycache__"}


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
    intervals: dict[str, str] = field(default_factory=dict)  # metric -> how the run's own interval was made


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
    methods = {
        k[: -len("_interval")]: v
        for k, v in metrics.items()
        if k.endswith("_interval") and isinstance(v, str)
    }
    common = dict(
        run_dir=run_dir,
        stage=str(run.get("stage") or run_dir.name),
        status=str(run.get("status")),
        seed=run.get("seed"),
        config=run.get("config") if isinstance(run.get("config"), dict) else {},
        start=str(run.get("start") or ""),
    )
    if common["stage"] != "eval":
        return [Record(model=None, metrics=numeric, order=order, intervals=methods, **common)]
    models = _eval_models(run, run_dir)
    shared = {k: v for k, v in numeric.items() if not any(k.startswith(f"{m}/") for m, _ in models)}
    out = []
    for i, (model, path) in enumerate(models):
        own = {k[len(model) + 1 :]: v for k, v in numeric.items() if k.startswith(f"{model}/")}
        how = {k[len(model) + 1 :]: v for k, v in methods.items() if k.startswith(f"{model}/")}
        out.append(Record(model=model, metrics={**shared, **own}, order=order * 1000 + i, model_path=path,
                          intervals=how, **common))  # fmt: skip
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


def x_value(value: Any, name: str, where: Path) -> float | None:
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


def _natural(value: Any) -> tuple:
    number = number_or_none(str(value))
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


def default_metrics(available: set[str]) -> list[str]:
    passk = sorted((m for m in available if re.fullmatch(r"pass@\d+", m)), key=lambda m: int(m[5:]))
    return passk + [m for m in HEADLINE if m in available]


def number_or_none(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
