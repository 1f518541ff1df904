"""Which points of a report were trained on the same prompts: each run's training data is traced to the
`pipeline subset` manifest it came from (its `prompt_ids`), through the run's config and, for an eval run,
through the model folder it scored."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from pipeline.stages.report.collect import Record
from pipeline.stages.report.tables import fmt_x

_MAX_DEPTH = 3  # eval -> model folder's run -> its data (-> a folder of that data)


@functools.lru_cache(maxsize=1024)
def _read(path: Path) -> dict | None:
    """A JSON object file, read once per report (many runs share one subset manifest)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _paths_in(config: dict[str, Any]) -> list[Path]:
    values = []
    for value in config.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item and len(item) < 4096 and "\n" not in item:
                values.append(Path(item.split("*")[0]) if "*" in item else Path(item))
    return values


def subset_prompts(config: dict[str, Any], model_path: str | None = None, depth: int = 0) -> frozenset | None:
    """The prompt ids of the subset a run trained on: a config value that is a subset's folder or file (its
    folder's manifest.json lists `prompt_ids`), or, one level down, a model folder whose run did."""
    candidates = _paths_in(config) + ([Path(model_path)] if model_path else [])
    for path in candidates:
        folder = path if path.is_dir() else path.parent
        manifest = _read(folder / "manifest.json") if folder.is_dir() else None
        if manifest and isinstance(manifest.get("prompt_ids"), list):
            return frozenset(str(p) for p in manifest["prompt_ids"])
    if depth + 1 >= _MAX_DEPTH:
        return None
    for path in candidates:
        run = _read(path / "run.json") if path.is_dir() else None
        if run and isinstance(run.get("config"), dict):
            found = subset_prompts(run["config"], None, depth + 1)
            if found is not None:
                return found
    return None


def prompt_matching(records: list[Record], groups: list[str], x_name: str | None) -> list[dict[str, Any]]:
    """Per x (or once without --x): each group's training prompts and whether the groups share them all.
    Empty when no run traces back to a subset manifest."""
    _read.cache_clear()  # files read by an earlier report in this process may have changed
    found: dict[tuple, list[frozenset | None]] = {}
    for r in records:
        found.setdefault((r.x, r.group), []).append(subset_prompts(r.config, r.model_path))
    if not any(p is not None for sets in found.values() for p in sets):
        return []
    out = []
    for x in sorted({x for x, _ in found}, key=lambda v: -1 if v is None else v):
        by_group = {g: found[(x, g)] for g in groups if (x, g) in found}
        sets = {g: set(s[0]) for g, s in by_group.items() if s and s[0] is not None and len(set(s)) == 1}
        entry = {
            "x": x,
            "prompts": {g: len(s) for g, s in sets.items()},
            "untraced": [g for g, s in by_group.items() if any(p is None for p in s)],
            "differ_across_seeds": [g for g, s in by_group.items() if None not in s and len(set(s)) > 1],
        }
        shared = set.intersection(*sets.values()) if sets else set()
        entry["shared"] = len(shared)
        entry["matched"] = len(sets) == len(by_group) > 1 and len({frozenset(s) for s in sets.values()}) == 1
        entry["label"] = "" if x is None else f"{x_name}={fmt_x(x)}"
        out.append(entry)
    return out


def matching_lines(entries: list[dict[str, Any]]) -> list[str]:
    """Markdown bullet lines for summary.md."""
    lines = []
    for e in entries:
        where = f"{e['label']}: " if e["label"] else ""
        counts = "; ".join(f"{g}: {n}" for g, n in e["prompts"].items())
        if e["matched"]:
            text = f"prompt-matched: every group trained on the same {e['shared']} prompts ({counts})"
        elif len(e["prompts"]) > 1:
            text = f"not prompt-matched: prompts per group ({counts}), {e['shared']} shared by all"
        else:
            text = f"one group traced ({counts})"
        if e["untraced"]:
            text += f"; no subset manifest found for {', '.join(e['untraced'])}"
        if e["differ_across_seeds"]:
            text += f"; seeds trained on different prompts in {', '.join(e['differ_across_seeds'])}"
        lines.append(f"- {where}{text}.")
    return lines
