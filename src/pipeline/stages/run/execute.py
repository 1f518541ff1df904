"""Running the plan: stages in-process or through accelerate launch, markers, shared-stage locks, parallel points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import outputs
from pipeline.errors import PipelineError
from pipeline.redaction import redact_argv
from pipeline.runinfo import atomic_write_text
from pipeline.stages.run.plan import (
    STALE,
    PlannedStage,
    marker_path,
    output_complete,
    plan_point,
    read_marker,
)
from pipeline.stages.run.spec import Pipeline


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
        launch(stage)
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


def node_rank() -> int:
    """This node's rank in a multi-node run (`NODE_RANK`, as the scripts use it; 0 when unset)."""
    value = os.environ.get("NODE_RANK", "0") or "0"
    if not value.isdigit():
        raise PipelineError(f"NODE_RANK={value!r}: expected a whole number (this node's rank)")
    return int(value)


def wait_for_node_zero(stage: PlannedStage, node: int, log) -> dict:
    """On node `node` (> 0), a stage without `launch:` runs on node 0 alone: wait for its marker."""
    limit = float(os.environ.get("PIPELINE_NODE_WAIT_S", "86400"))
    log(f"[{stage.spec.name}] node {node}: waiting for node 0 to run it (shared filesystem)")
    started = time.time()
    while True:
        marker = read_marker(stage.run_dir, stage.spec.name) or {}
        if marker.get("fingerprint") == stage.fingerprint and output_complete(stage.output_dir):
            return {"stage": stage.spec.name, "action": "skip", "reason": "done by node 0"}
        if time.time() - started >= limit:
            raise PipelineError(f"stage '{stage.spec.name}': node {node} waited {limit:g} s for node 0 to "
                                "run it; node 0 must run the same pipeline, on a filesystem both nodes see")  # fmt: skip
        time.sleep(min(10.0, max(limit / 10, 0.05)))


def launch_command(stage: PlannedStage) -> list[str]:
    # accelerate launch's arguments, through `pipeline.launch`: a stage's error is then one line, last
    command = [sys.executable, "-m", "pipeline.launch"]
    for key, value in (stage.launch or {}).items():
        bare = value is True or value is None or value == ""  # a flag without a value (`1 == True`: not bare)
        command += [f"--{key}"] if bare else [f"--{key}", str(value)]
    return command + ["-m", "pipeline.cli", stage.spec.stage, *stage.argv()]


def launch(stage: PlannedStage, where: str = "") -> None:
    """Run a `launch:` stage's processes of this node (`where`: which node, for the error)."""
    result = subprocess.run(launch_command(stage), check=False)
    if result.returncode != 0:
        raise PipelineError(
            f"stage '{stage.spec.name}' failed{where} (exit {result.returncode}); see its run.log"
        )


def run_point(pipe: Pipeline, point: dict, force_from: str | None, dry_run: bool, log) -> list[dict]:
    planned = plan_point(pipe, point, force_from)
    node = node_rank()
    records = []
    for stage in planned:
        if not dry_run and stage.action == "run" and node > 0:
            # another node: its processes join each launched stage; node 0 alone runs the others and
            # writes every marker and set-aside
            if stage.spec.launch:
                launch(stage, f" on node {node}")
                records.append({"stage": stage.spec.name, "action": "ran", "reason": f"node {node}"})
            else:
                records.append(wait_for_node_zero(stage, node, log))
            continue
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
