"""The train/eval split by problem, and the parquet files `pipeline synthetic-data` writes."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from pipeline.data import write_parquet_atomic
from pipeline.tasks.synthetic.problems import Problem, generate_problems
from pipeline.tasks.synthetic.rows import coderl_rows, preference_rows, sft_rows


def split_problems(
    problems: Sequence[Problem], eval_fraction: float, seed: int = 0
) -> tuple[list[Problem], list[Problem]]:
    """Deterministic train/eval split by problem; both sides keep generation order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(problems)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(1, n_eval), n - 1)
    order = list(range(n))
    random.Random(f"split:{seed}").shuffle(order)
    eval_idx = set(order[:n_eval])
    train = [p for i, p in enumerate(problems) if i not in eval_idx]
    held = [p for i, p in enumerate(problems) if i in eval_idx]
    return train, held


def export_task(
    output_dir: str | os.PathLike[str],
    num_problems: int = 200,
    seed: int = 0,
    eval_fraction: float = 0.1,
    responses_per_problem: int = 4,
    constant_negatives: int = 0,
) -> dict[str, str]:
    """Write SFT, preference and code-RL parquet files (train/eval split by problem).

    `constant_negatives` adds that many "other constant" pairs per problem to `pairs_train` (see
    `preference_rows`); `pairs_eval` always holds the task's own pairs; `problems_{train,eval}.jsonl` hold
    the problems themselves (for `pipeline collect` and `eval-code`). Returns ``{"sft_train": path, ...}``
    for the eight files.
    """
    if constant_negatives < 0:
        raise ValueError(f"constant_negatives must be >= 0, got {constant_negatives}")
    import pyarrow as pa

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = generate_problems(num_problems, seed)
    train, held = split_problems(problems, eval_fraction, seed)

    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    sft_schema = pa.schema([("messages", messages), ("task_id", pa.string())])
    pairs_schema = pa.schema(
        [("prompt", messages), ("chosen", messages), ("rejected", messages), ("task_id", pa.string())]
    )
    coderl_schema = pa.schema(
        [
            ("uid", pa.string()),
            ("prompt_pretokenized", pa.string()),
            ("unprocessed_response", pa.string()),
            ("normalized_reward", pa.float64()),
            ("task_id", pa.string()),
            ("pass_fraction", pa.float64()),
        ]
    )
    rl_all = coderl_rows(problems, responses_per_problem=responses_per_problem, seed=seed)

    written: dict[str, str] = {}
    for split, probs in (("train", train), ("eval", held)):
        ids = {p.task_id for p in probs}
        rl_rows = [r for r in rl_all if r["task_id"] in ids]
        for stem, rows, schema in (
            (f"sft_{split}", sft_rows(probs), sft_schema),
            (
                f"pairs_{split}",
                preference_rows(probs, constant_negatives if split == "train" else 0, seed),
                pairs_schema,
            ),
            (f"coderl_{split}", rl_rows, coderl_schema),
        ):
            path = out / f"{stem}.parquet"
            write_parquet_atomic(pa.Table.from_pylist(rows, schema=schema), path)
            written[stem] = str(path)
        written[f"problems_{split}"] = str(write_problems(probs, out / f"problems_{split}.jsonl"))
    return written


def write_problems(problems: Sequence[Problem], path: Path) -> Path:
    """The problems as JSON lines in the sandbox's synthetic format (task_id, prompt, tests, solution): what
    `pipeline collect` samples answers to and `pipeline eval-code` judges samples against."""
    from pipeline.runinfo import atomic_write_text

    lines = [json.dumps({"task_id": p.task_id, "prompt": p.prompt, "tests": list(p.tests), "solution": p.solution})
             for p in problems]  # fmt: skip
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
