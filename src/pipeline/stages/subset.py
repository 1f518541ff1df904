"""`pipeline subset`: a training subset for dataset-size sweeps, prompt-matched or size-matched.

    pipeline subset --data runs/data/pairs_train.parquet --size 4000 --output_dir runs/x/data
    pipeline subset --data ... --size 500 --size_unit prompts --output_dir ...
    pipeline subset --data other_source.parquet --size 4000 --match_subset runs/x/data --output_dir ...
    pipeline subset --data ... --size 4000 --mode same_prompts --num_prompts 500 --output_dir ...

Rows are grouped by prompt (the `prompt_pretokenized`, `prompt` or `messages` column: its user turns).
Prompts are ordered by a hash of `--data_seed` and the prompt itself, not by the pool they sit in: two
datasets (say majority-vote and self-consistency answers to overlapping prompts) order their shared prompts
alike, so their subsets of a size share prompts as far as the pools allow. A prompt's rows are ordered by
a hash of the seed, the prompt and the row (its `uid`, else its other columns). The run seed plays no part.

- `prefix` (prompt-matched): prompts in that order, all of a prompt's rows before the next prompt's, cut at
  `--size` rows (`--size_unit rows`, the last prompt possibly cut) or after `--size` whole prompts
  (`--size_unit prompts`). A smaller size is a prefix of every larger one.
- `--match_subset DIR` (size-matched across sources): the prompts of another subset (its manifest's
  `prompt_ids`) that this data holds come first, then this data's other prompts in the same order: a
  source with fewer responses per prompt reaches the same size with the same prompts and then new ones.
- `same_prompts` (size-matched within a source): the first `--num_prompts` prompts only, their rows taken
  round-robin (each prompt's first row, then each one's second, ...) up to `--size` rows. Every size sees the
  same prompts, topped up with more responses per prompt; a size larger than those prompts' rows is an error.

Writes `<output_dir>/train.parquet` and `manifest.json` (source files and sha256, mode, size and unit, the
`prompt_ids` used in order, what was matched), atomically. `pipeline run` sweeps call it with
`size: ${train_size}`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline import outputs
from pipeline.data import read_json_object, resolve_files, sha256_file
from pipeline.errors import PipelineError
from pipeline.sampling import ordered_prompts, prompt_id, prompt_key, row_identities

PROMPT_COLUMNS = ("prompt_pretokenized", "prompt", "messages")  # the text columns a subset is cut by
MODES = ("prefix", "same_prompts")


def subset_order(keys: list[str], mode: str, size: int, data_seed: int, num_prompts: int | None,
                 row_ids: list[str] | None = None, size_unit: str = "rows",
                 first_prompts: list[str] | None = None) -> list[int]:  # fmt: skip
    """Row indices of the subset, in order. `first_prompts`: prompt ids taken before all others (the
    prompts of a subset this one is matched to)."""
    prompts, groups = ordered_prompts(keys, row_ids or [str(i) for i in range(len(keys))], data_seed)
    if first_prompts:
        wanted = set(first_prompts)
        prompts = [k for k in prompts if prompt_id(k) in wanted] + [
            k for k in prompts if prompt_id(k) not in wanted
        ]
    if mode == "prefix":
        if size_unit == "prompts":
            if size > len(prompts):
                raise PipelineError(
                    f"--size {size} prompts: the data has only {len(prompts)} distinct prompts"
                )
            return [i for key in prompts[:size] for i in groups[key]]
        order = [i for key in prompts for i in groups[key]]
        if size > len(order):
            raise PipelineError(f"--size {size}: the data has only {len(order)} rows")
        return order[:size]
    if size_unit != "rows":
        raise PipelineError("--mode same_prompts counts --size in rows (its prompts are --num_prompts)")
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


def matched_prompts(folder: str) -> list[str]:
    """The `prompt_ids` of another subset's manifest (`--match_subset`)."""
    manifest = read_json_object(Path(folder) / "manifest.json", "--match_subset")
    ids = manifest.get("prompt_ids")
    if not isinstance(ids, list):
        raise PipelineError(f"--match_subset: {folder}/manifest.json lists no prompt_ids (made by an older "
                            "`pipeline subset`: make that subset again)")  # fmt: skip
    return ids


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="pipeline subset", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))  # fmt: skip
    parser.add_argument("--data", required=True, help="parquet/jsonl file(s): a file, glob, list or folder")
    parser.add_argument("--size", type=int, required=True, help="the subset's size, in --size_unit")
    parser.add_argument(
        "--size_unit",
        choices=("rows", "prompts"),
        default="rows",
        help="rows (default; the last prompt may be cut) or whole prompts",
    )
    parser.add_argument("--match_subset", help="another subset's folder: its prompts first, then new ones")
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
    inputs = [*files, *([args.match_subset] if args.match_subset else [])]  # never replaced by the output
    outputs.check_replaceable(args.output_dir, "subset", inputs)
    table: pa.Table = load_files(args.data, "--data").data.table
    column = next((c for c in PROMPT_COLUMNS if c in table.column_names), None)
    if column is None:
        raise PipelineError(
            f"--data: no prompt column (need one of {', '.join(PROMPT_COLUMNS)}) in {files[0]}"
        )
    keys = [prompt_key(v) for v in table.column(column).to_pylist()]
    first = matched_prompts(args.match_subset) if args.match_subset else None
    order = subset_order(keys, args.mode, args.size, args.data_seed, args.num_prompts,
                         row_identities(table, column), args.size_unit, first)  # fmt: skip
    subset = table.take(pa.array(order, type=pa.int64()))
    used = [prompt_id(k) for k in dict.fromkeys(keys[i] for i in order)]
    manifest = {
        "sources": [{"path": str(f), "sha256": sha256_file(f)} for f in files],
        "mode": args.mode,
        "size": args.size,
        "size_unit": args.size_unit,
        "rows": len(order),
        "data_seed": args.data_seed,
        "num_prompts": len(used),
        "prompt_column": column,
        "rows_in": table.num_rows,
        "prompt_ids": used,
    }
    if first is not None:
        shared = len(set(first) & set(used))
        manifest["matched_to"] = {
            "subset": str(args.match_subset),
            "its_prompts": len(first),
            "shared": shared,
        }
    with outputs.replacing(args.output_dir, "subset", inputs) as tmp:
        pq.write_table(subset, tmp / "train.parquet")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(
        f"subset: {len(order)} rows of {manifest['num_prompts']} prompts -> {args.output_dir}/train.parquet"
    )
    return manifest
