"""Data I/O shared by every stage: resolve file specs, load parquet/jsonl into `datasets`, write atomically."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

# file suffix -> `datasets` builder name
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def resolve_files(spec: str, what: str = "data") -> list[str]:
    """Expand a file, folder, glob or comma-separated list into a sorted list of data files.

    Raises a one-line `PipelineError` naming the spec when nothing usable is found.
    """
    files: list[str] = []
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        if os.path.isdir(part):
            found = sorted(str(p) for p in Path(part).iterdir() if p.suffix in FORMATS and p.is_file())
            if not found:
                raise PipelineError(f"{what}: folder '{part}' holds no .parquet/.jsonl/.json files")
            files += found
        elif any(ch in part for ch in "*?["):
            found = sorted(glob.glob(part))
            if not found:
                raise PipelineError(f"{what}: no file matches '{part}'")
            files += found
        elif os.path.isfile(part):
            files.append(part)
        else:
            raise PipelineError(f"{what}: file not found: '{part}'")
    if not files:
        raise PipelineError(f"{what}: empty file list '{spec}'")
    suffixes = {Path(f).suffix for f in files}
    bad = [f for f in files if Path(f).suffix not in FORMATS]
    if bad:
        raise PipelineError(f"{what}: '{bad[0]}' is not .parquet, .jsonl or .json")
    if len({FORMATS[s] for s in suffixes}) > 1:
        raise PipelineError(
            f"{what}: mixes parquet and json files ({', '.join(sorted(suffixes))}); use one format"
        )
    return files


def load_files(spec: str, what: str = "data") -> datasets.Dataset:
    """Load parquet/jsonl/json files into one `datasets.Dataset` (read through the local cache only)."""
    import datasets

    files = resolve_files(spec, what)
    builder = FORMATS[Path(files[0]).suffix]
    if builder == "parquet":
        check_parquet_files(files, what)
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as err:  # json decode errors etc.: report the root cause in one line
        cause = err.__cause__ or err
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise PipelineError(f"{what}: cannot read {files[0] if len(files) == 1 else spec}: {first}") from None
    if len(ds) == 0:
        raise PipelineError(f"{what}: '{spec}' has no rows")
    return ds


def check_parquet_files(files: list[str], what: str) -> int:
    """Open each parquet footer (cheap) so a corrupt or empty file is named before loading; returns rows."""
    import pyarrow.parquet as pq

    total = 0
    for path in files:
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as err:
            raise PipelineError(f"{what}: cannot read {path}: not a valid parquet file ({err})") from None
        if rows == 0:
            raise PipelineError(f"{what}: '{path}' has no rows")
        total += rows
    return total


def load_train_eval(args: Any, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Training and (optional) evaluation datasets from `train_data`/`eval_data` or a `datasets` name.
    `args`: a `pipeline.configs.DataArguments` (not imported here: configs imports this module)."""
    if args.train_data:
        train = load_files(args.train_data, "train_data")
        evaluation = load_files(args.eval_data, "eval_data") if args.eval_data else None
    elif args.dataset_name:
        import datasets

        if os.path.exists(args.dataset_name):  # a local file or folder given as dataset_name
            train = load_files(args.dataset_name, "dataset_name")
            evaluation = load_files(args.eval_data, "eval_data") if args.eval_data else None
        else:
            try:
                loaded = datasets.load_dataset(args.dataset_name, name=args.dataset_config)
            except Exception as err:
                raise PipelineError(
                    f"dataset_name '{args.dataset_name}': cannot load: {str(err).splitlines()[0]}"
                ) from None
            if args.dataset_train_split not in loaded:
                raise PipelineError(
                    f"dataset_name '{args.dataset_name}' has no split '{args.dataset_train_split}' "
                    f"(splits: {', '.join(loaded)}); set dataset_train_split"
                )
            train = loaded[args.dataset_train_split]
            evaluation = loaded.get(args.dataset_test_split)
            if args.eval_data:
                evaluation = load_files(args.eval_data, "eval_data")
    else:
        raise PipelineError("no training data: set `train_data` (parquet/jsonl files) or `dataset_name`")
    if args.max_train_samples is not None and args.max_train_samples < len(train):
        from pipeline.sampling import first_rows

        train = first_rows(train, args.max_train_samples)  # nested, prompt by prompt, whatever the run seed
    if (
        evaluation is not None
        and args.max_eval_samples is not None
        and args.max_eval_samples < len(evaluation)
    ):
        evaluation = evaluation.select(range(args.max_eval_samples))
    return train, evaluation


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike, **kwargs) -> Path:
    """Write a parquet file under a temporary name and rename it when complete."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, **kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def remove_stale_temp_files(folder: str | os.PathLike, name_glob: str) -> list[str]:
    """Remove the temporary files (`.NAME.tmp-PID`, see `write_parquet_atomic`) that a killed run left in
    `folder` for outputs named like `name_glob`. Call it only while nothing else writes there."""
    removed = []
    for tmp in sorted(Path(folder).glob(f".{name_glob}.tmp-*")):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def read_json_object(path: str | os.PathLike, what: str | None = None) -> dict:
    """A JSON file holding an object; anything else is one line naming `what` (a config key) and the file."""
    prefix = f"{what}: " if what else ""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise PipelineError(f"{prefix}cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{prefix}{path} is not a JSON object")
    return data


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (what `sha256sum` prints), read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where the pipeline keeps what it can recompute (file hashes): $PIPELINE_CACHE_DIR, else
    $XDG_CACHE_HOME/pipeline, else ~/.cache/pipeline."""
    if os.environ.get("PIPELINE_CACHE_DIR"):
        return Path(os.environ["PIPELINE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pipeline"


def cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (real path, size, mtime): a 14 GB reference is hashed once, not by
    every rank of every job. The cache is a JSON file per file hashed; a changed file is hashed again."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    stamp = {"path": real, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    entry = cache_dir() / "sha256" / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")
    try:
        known = json.loads(entry.read_text())
        if {k: known.get(k) for k in stamp} == stamp:
            return known["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = sha256_file(real)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({**stamp, "sha256": digest}))
        os.replace(tmp, entry)
    except OSError:  # a read-only home: hash again next time
        pass
    return digest


def prepared_shards(data_path: str | os.PathLike, view: str, split: str) -> list[str]:
    """The parquet shards of one view and split of a `pipeline prepare` output, in order."""
    return sorted(glob.glob(str(Path(data_path) / view / f"{split}-*.parquet")))


def read_prepared_split(
    data_path: str | os.PathLike, view: str, split: str, columns: list[str]
) -> pa.Table | None:
    """One view and split of a `pipeline prepare` output as one table (None when it has no shards)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = prepared_shards(data_path, view, split)
    if not files:
        return None
    require_columns(files[0], columns)
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def require_columns(path: str | os.PathLike, columns: list[str]) -> None:
    """One line naming the parquet file, the missing column and the ones it has."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise PipelineError(f"{path}: no column '{missing[0]}' (it has {', '.join(names)}); check the key "
                            "naming it, or prepare the data again")  # fmt: skip


def read_row_range(
    files: list[str], rows_per_file: list[int], start: int, stop: int, columns: list[str]
) -> pa.Table:
    """Rows [start, stop) of parquet files read as one sequence, reading only the row groups that hold them
    (so scoring or tokenizing a split part by part reads each row group about once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pieces, offset = [], 0
    for path, count in zip(files, rows_per_file, strict=True):
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            handle = pq.ParquetFile(path)
            groups, first, group_start = [], None, 0
            for g in range(handle.metadata.num_row_groups):
                n = handle.metadata.row_group(g).num_rows
                if group_start + n > lo - offset and group_start < hi - offset:
                    groups.append(g)
                    first = group_start if first is None else first
                group_start += n
            table = handle.read_row_groups(groups, columns=columns)
            pieces.append(table.slice(lo - offset - first, hi - lo))
        offset += count
    if not pieces:
        return pa.table({c: pa.array([], pa.null()) for c in columns})
    return pa.concat_tables(pieces)


MAX_YAML_VALUES = 100_000  # a recipe or pipeline file expands to at most this many values (aliases included)


def _expanded_values(node, memo: dict, limit: int) -> int:
    """How many values a composed YAML node stands for once every alias is expanded (stops past `limit`)."""
    if id(node) in memo:
        return memo[id(node)]
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [item for pair in node.value for item in pair]
    else:
        children = []
    for child in children:
        total += _expanded_values(child, memo, limit)
        if total > limit:
            break
    memo[id(node)] = total
    return total


def load_yaml(text: str, where: str) -> object:
    """`yaml.safe_load`, refusing in one line a document whose aliases expand past `MAX_YAML_VALUES`
    values (a few hundred bytes of nested aliases stand for billions once written out, e.g. into run.json)
    or that nests too deeply to read."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_values(node, {}, MAX_YAML_VALUES) > MAX_YAML_VALUES:
            raise PipelineError(f"{where}: the YAML expands to more than {MAX_YAML_VALUES:,} values (aliases "
                                "repeated inside aliases); write the values out or use fewer aliases")  # fmt: skip
        return yaml.safe_load(text)
    except RecursionError:
        raise PipelineError(f"{where}: the YAML is nested too deeply to read") from None


def start_job(
    folder: Path, job: dict, state, parts: Path, part_glob: str, holds: str, hint: str
) -> list[str]:
    """The start of a resumable, part-by-part job (logp, collect): refuse a folder whose `job.json` records
    another job (one line naming what differs), remove the part files a killed run left half written, then
    record this job. Every rank calls it; the main process alone writes. Returns the files removed."""
    from pipeline.runinfo import atomic_write_text

    job_path = Path(folder) / "job.json"
    if job_path.is_file():
        previous = json.loads(job_path.read_text())
        changed = [k for k in job if previous.get(k) != job[k]]
        if changed:
            raise PipelineError(
                f"{folder} holds {holds} of another job ({', '.join(changed)} differ); {hint}"
            )
    stale: list[str] = []
    if state.is_main_process:
        Path(parts).mkdir(parents=True, exist_ok=True)
        # every rank is still before the barrier below, so no part being written now is this run's
        stale = remove_stale_temp_files(parts, part_glob)
    state.wait_for_everyone()
    if state.is_main_process:
        atomic_write_text(job_path, json.dumps(job, indent=2) + "\n")
    return stale
