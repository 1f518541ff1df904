"""Code problems as a chat policy sees them: a problem file in any format the sandbox judges, read into
(problem id, chat prompt, how an answer becomes a program, the check).

| format | the user message | the program of an answer (one code fence stripped) |
|---|---|---|
| synthetic task (`prompt`, `tests`) | `prompt` | the answer |
| HumanEval (`prompt`, `test`, `entry_point`) | `prompt` (the signature and docstring) | `prompt`, a newline, the answer: a whole function redefines the stub and keeps the prompt's imports |
| MBPP (`text`, `test_list`) | `text`, then "Your code should pass these tests:" and the tests | the answer |
| stdin/stdout (`inputs`/`outputs` or `input_output`) | the first of `question`, `prompt`, `problem`, `description` | the answer |

The reward of an answer is `2 * passed / total - 1` in [-1, 1] (`pipeline.rewards.reward_from_fraction`:
every test failed -1, all passed +1; HumanEval's one check gives -1 or +1), the same mapping as the synthetic
task's `normalized_reward` and GRPO's `code_execution` reward.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.sandbox import Check, strip_code_fence
from pipeline.sandbox.problems import check_for, detect_format

STDIO_TEXT_FIELDS = ("question", "prompt", "problem", "description")


def read_jsonl(path: str | os.PathLike, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for every non-blank line of a JSON-lines file, plain or gzipped."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what}: file not found: '{path}'")
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"  # by content, not name: a .gz suffix may lie either way
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise PipelineError(f"{path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(obj, dict):
                    raise PipelineError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: cannot read ({e})") from None


def load_problem_records(path: str | os.PathLike, what: str = "--problems") -> dict[str, dict[str, Any]]:
    """task_id -> problem record (JSON lines, gzipped or not, or parquet), each in one of the sandbox's
    formats (checked here: one line naming the file and line of the first bad problem)."""
    records: dict[str, dict[str, Any]] = {}
    if str(path).endswith(".parquet"):
        import pyarrow.parquet as pq

        if not Path(path).is_file():
            raise PipelineError(f"{what}: file not found: '{path}'")
        rows = enumerate(pq.read_table(path).to_pylist(), 1)
    else:
        rows = read_jsonl(path, what)
    for lineno, obj in rows:
        if "task_id" not in obj:
            raise PipelineError(f"{path}:{lineno}: missing key 'task_id'")
        task_id = obj["task_id"]
        if not isinstance(task_id, str):
            raise PipelineError(
                f"{path}:{lineno}: key 'task_id' must be a string, got {type(task_id).__name__}"
            )
        check_for(obj, f"{path}:{lineno}")
        if task_id in records:
            raise PipelineError(f"{path}:{lineno}: duplicate task_id '{task_id}'")
        records[task_id] = obj
    if not records:
        raise PipelineError(f"{path}: no problems in the file")
    return records


@dataclass
class CodeProblem:
    problem_id: str
    format: str
    messages: list[dict[str, str]]
    check: Check
    code_prefix: str = ""  # HumanEval: the prompt, put in front of every answer

    def program(self, answer: str) -> str:
        body = strip_code_fence(answer)
        return f"{self.code_prefix}\n{body}" if self.code_prefix else body


def user_text(record: dict[str, Any], where: str) -> str:
    shape = detect_format(record, where)
    if shape in ("synthetic", "humaneval"):
        return str(record["prompt"])
    if shape == "mbpp":
        tests = "\n".join(str(t) for t in record["test_list"])
        return f"{record['text']}\nYour code should pass these tests:\n{tests}"
    text = next((record[k] for k in STDIO_TEXT_FIELDS if isinstance(record.get(k), str)), None)
    if text is None:
        raise PipelineError(
            f"{where}: a stdin/stdout problem needs its statement in one of {', '.join(STDIO_TEXT_FIELDS)}"
        )
    return text


def code_problem(task_id: str, record: dict[str, Any], where: str = "problem") -> CodeProblem:
    shape = detect_format(record, where)
    messages = [{"role": "user", "content": user_text(record, where)}]
    prefix = str(record["prompt"]) if shape == "humaneval" else ""
    return CodeProblem(task_id, shape, messages, check_for(record, where), prefix)


def load_code_problems(path: str | os.PathLike, what: str = "--problems") -> list[CodeProblem]:
    """Every problem of a file, in file order."""
    records = load_problem_records(path, what)
    return [code_problem(task_id, record, f"{path}: {task_id}") for task_id, record in records.items()]
