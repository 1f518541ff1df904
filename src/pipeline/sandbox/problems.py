"""Problem records in the formats the sandbox judges, detected from their fields.

| format | fields | check | the candidate program for a completion |
|---|---|---|---|
| HumanEval | `prompt`, `test`, `entry_point` (`canonical_solution`) | `HumanEvalTest`: `check(entry_point)`, the prompt's helpers defined in the checker | `prompt + completion` |
| MBPP | `text`, `code`, `test_list` (`test_setup_code`) | `AssertTests(test_list, test_setup_code)`: each assert alone; the function name is what the tests call | the completion |
| synthetic task | `prompt`, `tests` (`solution`) | `AssertTests(tests)` | the completion |
| stdin/stdout (APPS, CodeContests, LiveCodeBench) | `inputs`, `outputs` (or APPS' `input_output` JSON) (`solution`/`solutions`) | `StdioTests`: stdout equal token for token | the completion |

A record in none of these shapes is a one-line error naming the fields it has and the shapes accepted.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.errors import PipelineError
from pipeline.sandbox.checks import AssertTests, Check, HumanEvalTest, StdioTests

SHAPES = ("HumanEval (prompt, test, entry_point)", "MBPP (text, code, test_list[, test_setup_code])",
          "the synthetic task (prompt, tests)", "stdin/stdout (inputs, outputs; or input_output)")  # fmt: skip


def detect_format(record: dict[str, Any], where: str = "problem") -> str:
    """'humaneval', 'mbpp', 'stdio' or 'synthetic'; anything else is a one-line error."""
    keys = set(record)
    if {"prompt", "test", "entry_point"} <= keys:
        return "humaneval"
    if "test_list" in keys:
        return "mbpp"
    if {"inputs", "outputs"} <= keys or "input_output" in keys:
        return "stdio"
    if "tests" in keys:
        return "synthetic"
    raise PipelineError(
        f"{where}: fields {sorted(keys)} match no problem format; accepted: {'; '.join(SHAPES)}"
    )


def _strings(value: Any, field: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise PipelineError(f"{where}: '{field}' must be a list, got {type(value).__name__}")
    return tuple(v if isinstance(v, str) else json.dumps(v) for v in value)


def _stdio_lists(record: dict[str, Any], where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if "input_output" in record:
        spec = record["input_output"]
        try:
            spec = json.loads(spec) if isinstance(spec, str) else spec
        except ValueError:
            raise PipelineError(f"{where}: 'input_output' is not valid JSON") from None
        if not isinstance(spec, dict) or not {"inputs", "outputs"} <= set(spec):
            raise PipelineError(f"{where}: 'input_output' must hold 'inputs' and 'outputs'")
        record = spec
    inputs = _strings(record["inputs"], "inputs", where)
    outputs = _strings(record["outputs"], "outputs", where)
    if len(inputs) != len(outputs) or not inputs:
        raise PipelineError(
            f"{where}: {len(inputs)} inputs and {len(outputs)} outputs; they must pair up (and exist)"
        )
    return inputs, outputs


def check_for(record: dict[str, Any], where: str = "problem") -> Check:
    """The sandbox check of a problem record (see the module docstring)."""
    shape = detect_format(record, where)
    if shape == "humaneval":
        for key in ("prompt", "test", "entry_point"):
            if not isinstance(record[key], str):
                raise PipelineError(
                    f"{where}: key '{key}' must be a string, got {type(record[key]).__name__}"
                )
        return HumanEvalTest(record["test"], record["entry_point"], record["prompt"])
    if shape == "mbpp":
        setup = record.get("test_setup_code") or ""
        return AssertTests(_strings(record["test_list"], "test_list", where), str(setup))
    if shape == "synthetic":
        return AssertTests(_strings(record["tests"], "tests", where))
    return StdioTests(*_stdio_lists(record, where))


def program_for(record: dict[str, Any], completion: str, where: str = "problem") -> str:
    """The program the candidate loads for a completion: HumanEval's prompt + completion, else the completion."""
    return record["prompt"] + completion if detect_format(record, where) == "humaneval" else completion


def reference_solution(record: dict[str, Any]) -> str | None:
    """The record's own solution as a completion (for checking a problem set), or None."""
    shape = detect_format(record)
    if shape == "humaneval":
        return record.get("canonical_solution")
    if shape == "mbpp":
        return record.get("code")
    solutions = record.get("solutions")
    if isinstance(solutions, str):
        try:
            solutions = json.loads(solutions)
        except ValueError:
            solutions = [solutions]
    return record.get("solution") or (solutions[0] if isinstance(solutions, list) and solutions else None)
