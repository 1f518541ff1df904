"""`pipeline subset`: a training subset of N rows for dataset-size sweeps, prompt-matched or size-matched.

    pipeline subset --data runs/data/pairs_train.parquet --size 4000 --mode prefix --output_dir runs/x/data
    pipeline subset --data ... --size 4000 --mode same_prompts --num_prompts 500 --output_dir ...

Rows are grouped by prompt (the `prompt_pretokenized`, `prompt` or `messages` column: its user turns), and
both the prompt order and the row order within each prompt are fixed by `--data_seed` alone — not by the run
seed — so every point of a sweep draws from the same ordering:

- `prefix` (prompt-matched): prompts in that order, all of a prompt's rows before the next prompt's, cut at
  `size` rows. A smaller size is a prefix of every larger one, so sizes differ by prompts added.
- `same_prompts` (size-matched): the first `num_prompts` prompts only, taking their rows round-robin (each
  prompt's first row, then each one's second, ...) up to `size`. Every size sees the same prompts, topped up
  with more responses per prompt; a size larger than those prompts' rows is an error.

Writes `<output_dir>/train.parquet` and `manifest.json` (source files and sha256, mode, size, prompts used),
atomically. `pipeline run` sweeps call it with `size: ${train_size}`.
"""

from __future__ import annotations

import argparse
import json
import random

from pipeline import outputs
from pipeline.data import resolve_files, sha256_file
from pipeline.errors import PipelineError

PROMPT_COLUMNS = ("prompt_pretokenized", "prompt", "messages")
MODES = ("prefix", "same_prompts")


def prompt_key(value) -> str:
    """A prompt's identity: its user turns (a `messages` row's answer is not part of its prompt)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if isinstance(value, list):
        return json.dumps(
            [m.get("content") for m in value if isinstance(m, dict) and m.get("role") != "assistant"]
        )
    return json.dumps(value, sort_keys=True, default=str)


def subset_order(keys: list[str], mode: str, size: int, data_seed: int, num_prompts: int | None) -> list[int]:
    """Row indices of the subset, in order."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    rng = random.Random(data_seed)
    prompts = sorted(groups)
    rng.shuffle(prompts)
    for key in prompts:  # the within-prompt order depends on data_seed only as well
        rng.shuffle(groups[key])
    if mode == "prefix":
        order = [i for key in prompts for i in groups[key]]
        if size > len(order):
            raise PipelineError(f"--size {size}: the data has only {len(order)} rows")
        return order[:size]
    if num_prompts is None or num_prompts < 1:
        raise PipelineError("--mode same_prompts needs --num_prompts (how many prompts every size shares)")
    if num_prompts > len(prompts):
        raise PipelineError(f"--num_prompts {num_prompts}: the data has only {len(prompts)} distinct prompts")
    chosen = [groups[key] for key in prompts[:num_prompts]]
    order = [rows[r] for r in range(max(len(rows) for rows in chosen)) for rows in chosen if r < len(rows)]
    if size > len(order):
        raise PipelineError(
            f"--size {size}: the first {num_prompts} prompts have only {len(order)} rows; lower --size or raise "
            "--num_prompts"
        )
    return order[:size]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="pipeline subset", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))  # fmt: skip
    parser.add_argument("--data", required=True, help="parquet/jsonl file(s): a file, glob, list or folder")
    parser.add_argument("--size", type=int, required=True, help="rows in the subset")
    parser.add_argument(
        "--mode", choices=MODES, default="prefix", help="prefix (prompt-matched) or same_prompts"
    )
    parser.add_argument("--num_prompts", type=int, help="same_prompts: the prompts every size shares")
    parser.add_argument("--data_seed", type=int, default=0, help="fixes the prompt and row order (default 0)")
    parser.add_argument(
        "--seed", type=int, help="accepted and ignored: the order must not depend on the run seed"
    )
    parser.add_argument("--output_dir", required=True, help="folder for train.parquet and manifest.json")
    args = parser.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import load_files

    if args.size < 1:
        raise PipelineError(f"--size must be >= 1, got {args.size}")
    files = resolve_files(args.data, "--data")
    outputs.check_replaceable(args.output_dir, "subset", files)
    table: pa.Table = load_files(args.data, "--data").data.table
    column = next((c for c in PROMPT_COLUMNS if c in table.column_names), None)
    if column is None:
        raise PipelineError(
            f"--data: no prompt column (need one of {', '.join(PROMPT_COLUMNS)}) in {files[0]}"
        )
    keys = [prompt_key(v) for v in table.column(column).to_pylist()]
    order = subset_order(keys, args.mode, args.size, args.data_seed, args.num_prompts)
    subset = table.take(pa.array(order, type=pa.int64()))
    manifest = {
        "sources": [{"path": str(f), "sha256": sha256_file(f)} for f in files],
        "mode": args.mode,
        "size": args.size,
        "data_seed": args.data_seed,
        "num_prompts": len({keys[i] for i in order}),
        "prompt_column": column,
        "rows_in": table.num_rows,
    }
    with outputs.replacing(args.output_dir, "subset", files) as tmp:
        pq.write_table(subset, tmp / "train.parquet")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"subset: {args.size} rows of {manifest['num_prompts']} prompts -> {args.output_dir}/train.parquet")
    return manifest
