"""Which rows a smaller training set keeps: nested, prompt-matched, independent of the run seed.

Dataset-size sweeps compare sizes, sources and seeds; their subsets must differ only in size. Prompts are
ordered by a hash of a data seed and the prompt itself (its user turns), not by the pool they sit in, and
a prompt's rows by a hash of the seed, the prompt and the row (its `uid`, else its other columns):

- a smaller size is a prefix of a larger one (nested);
- two datasets order the prompts they share alike (prompt-matched as far as their pools allow);
- every run seed of a sweep trains on the same rows.

`pipeline subset` cuts files this way, and `max_train_samples` keeps the same rows (`first_rows`). On
prepared data (IPS, DPO on `data_path`) the prompt is its `prompt_id` and the row its position, ordered with
numpy (`nested_ids_order`), so a 10M-row split holds no Python object per row.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

PROMPT_COLUMNS = ("prompt_pretokenized", "prompt", "messages", "prompt_ids", "prompt_id")


def prompt_key(value) -> str:
    """A prompt's identity: its user turns (a `messages` row's answer is not part of its prompt)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return json.dumps([m.get("content") for m in value if m.get("role") != "assistant"])
    return json.dumps(value, sort_keys=True, default=str)


def prompt_id(key: str) -> str:
    """A prompt's id in manifests: a hash of its identity (the same prompt has the same id in any file)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _rank(data_seed: int, *parts: str) -> str:
    return hashlib.sha256("\0".join([str(data_seed), *parts]).encode()).hexdigest()


def ordered_prompts(
    keys: list[str], row_ids: list[str], data_seed: int
) -> tuple[list[str], dict[str, list[int]]]:
    """(prompts in seeded-hash order, each prompt's row indices in seeded-hash order); neither depends on
    which other prompts or rows the data holds."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    for key, rows in groups.items():
        rows.sort(key=lambda i: (_rank(data_seed, key, row_ids[i]), i))
    return sorted(groups, key=lambda key: (_rank(data_seed, key), key)), groups


def prompt_column(names: list[str]) -> str | None:
    return next((c for c in PROMPT_COLUMNS if c in names), None)


def row_identities(table, column: str | None) -> list[str]:
    """What orders a prompt's rows: the `uid` column, else the row's other columns."""
    if "uid" in table.column_names:
        return [str(u) for u in table.column("uid").to_pylist()]
    rest = table.drop_columns([column]) if column else table
    return [json.dumps(row, sort_keys=True, default=str) for row in rest.to_pylist()]


def nested_order(table, data_seed: int = 0) -> list[int]:
    """Every row index of an Arrow table, prompt by prompt in the seeded-hash order (rows of a table
    without a prompt column: each row its own prompt)."""
    column = prompt_column(table.column_names)
    row_ids = row_identities(table, column)
    keys = [prompt_key(v) for v in table.column(column).to_pylist()] if column else row_ids
    prompts, groups = ordered_prompts(keys, row_ids, data_seed)
    return [i for key in prompts for i in groups[key]]


def first_rows(dataset, n: int | None, data_seed: int = 0):
    """The first `n` rows of a `datasets.Dataset` in the nested order (all rows when n is None or larger):
    what `max_train_samples` keeps, for every run seed alike."""
    if dataset is None or not n or n >= len(dataset):
        return dataset
    table = dataset.with_format("arrow")[:]  # the rows as selected so far, as one Arrow table
    return dataset.select(nested_order(table, data_seed)[:n], keep_in_memory=True)


def _mix(values: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of the values and the seed: a well-spread, seeded hash of 64-bit ids."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (seed + 1)) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def nested_ids_order(prompt_ids: np.ndarray, row_ids: np.ndarray, data_seed: int = 0) -> np.ndarray:
    """Positions of the rows, prompt by prompt in a seeded-hash order of `prompt_ids` (uint64), each prompt's
    rows in a seeded-hash order of `row_ids`: the nested order of `nested_order`, for numeric ids."""
    prompt_rank = _mix(prompt_ids, data_seed)
    row_rank = _mix(row_ids, data_seed + 1)
    return np.lexsort((row_rank, prompt_ids, prompt_rank))
