"""The tokenized view of a prepared split: built once, kept on disk as Arrow, memory-mapped by every reader.

Training on millions of logged rows cannot hold them in Python: every rank would load the whole split and
every stored logp into a dict, on every restart. Instead the rows of `rl/{split}` are tokenized by
`tokenization.tokenize_prompt_response` (the function the logp stage scored with) and joined with the
stored reference logps, part by part, into Arrow IPC files:

    row           int64         the row's position in the split (rewards and prompt ids are read by it)
    uid           string
    input_ids     list<int32>   prompt + response tokens (the response cut to max_length)
    prompt_len    int32
    response_len  int32
    truncated     bool
    ref_logps     list<float32> the stored per-token logps; null where the store has none for the row
                                (only with a logp store)

Parts hold `part_rows` consecutive rows; ranks build parts r, r+W, ...; each part is written under a
temporary name and renamed, so a killed build resumes where it stopped and two processes building at once
only duplicate work. `view.json`, written last, marks the view complete. Readers open the parts as one
memory-mapped `datasets.Dataset`: the pages a batch touches are read, nothing else.

The folder's name is a hash of everything that decides the bytes (the prepared data's manifest, the
tokenizer, `max_length`, the response column, the logp store's manifest and part files), so a change to
any of them builds a new view rather than reusing a stale one. It lives in the logp store
(`token_views/`), or in the prepared folder when there is no store, unless `cache_dir` says otherwise.

Stored logps are joined by position: a store made by `pipeline logp` on this very prepared data holds the
split's rows in order (checked uid by uid). A store that does not (one imported from pickles) is joined by
uid with Arrow's hash join.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data import prepared_shards, read_json_object, read_row_range, require_columns
from pipeline.errors import PipelineError
from pipeline.logp_store import MANIFEST, nonfinite_rows, prepare_manifest_sha256

logger = logging.getLogger("pipeline.token_view")

VIEW_FORMAT = 1
PART_ROWS = 65_536  # rows per view part: the unit of resumption (a few hundred MB at 500 tokens per row)
BUILD_BATCH = 4_096  # rows tokenized and joined at a time while a part is written
COMPLETE = "view.json"


def view_schema(with_logps: bool) -> pa.Schema:
    fields = [("row", pa.int64()), ("uid", pa.string()), ("input_ids", pa.list_(pa.int32())),
              ("prompt_len", pa.int32()), ("response_len", pa.int32()), ("truncated", pa.bool_())]  # fmt: skip
    if with_logps:
        fields.append(("ref_logps", pa.list_(pa.float32())))
    return pa.schema(fields)


@dataclass
class ViewRequest:
    """Which view: the prepared split, how it is tokenized, and which logp store is joined (if any)."""

    data_path: str
    split: str
    max_length: int | None
    response_key: str
    logp_dir: str | None = None
    cache_dir: str | None = None
    part_rows: int = PART_ROWS


@dataclass
class TokenView:
    folder: Path
    rows: int
    info: dict
    dataset: object  # datasets.Dataset, memory-mapped
    reused: bool

    def column(self, name: str) -> np.ndarray:
        """One fixed-width column (row, prompt_len, response_len, truncated) as a numpy array."""
        return self.dataset.data.column(name).to_numpy()

    def has_logps(self) -> np.ndarray:
        return ~self.dataset.data.column("ref_logps").is_null().to_numpy()


# ------------------------------------------------------------------------------------------ identity


def store_identity(logp_dir: str) -> str:
    """The logp store's manifest and its part files (names, sizes, modification times): a store made or
    edited again is another store."""
    folder = Path(logp_dir)
    parts = files_identity([str(p) for p in sorted(folder.glob("*-part-*.parquet"))])
    return hashlib.sha256((folder / MANIFEST).read_bytes() + parts.encode()).hexdigest()


def files_identity(files: list[str]) -> str:
    """Names, sizes and modification times of files: a file written again is another file."""
    digest = hashlib.sha256()
    for path in files:
        stat = os.stat(path)
        digest.update(f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def view_identity(request: ViewRequest, tokenizer_fingerprint: str) -> dict:
    prepare = read_json_object(Path(request.data_path) / MANIFEST, "data_path")
    return {
        "format": VIEW_FORMAT,
        "prepare_manifest_sha256": prepare_manifest_sha256(prepare),
        "rl_files": files_identity(prepared_shards(request.data_path, "rl", request.split)),
        "split": request.split,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "max_length": request.max_length,
        "response_column": request.response_key,
        "logp_store": store_identity(request.logp_dir) if request.logp_dir else None,
        "part_rows": request.part_rows,
    }


def view_folder(request: ViewRequest, identity: dict) -> Path:
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    base = request.cache_dir or request.logp_dir or request.data_path
    return Path(base) / "token_views" / f"{request.split}-{key}"


# ------------------------------------------------------------------------------------------ stored logps


class StoredLogps:
    """The logps of a split's rows [start, stop), from a store in split order (read part by part) or, for a
    store that is not, by uid through a hash join."""

    def __init__(self, logp_dir: str, split: str, uids_in_order: bool):
        self.folder = Path(logp_dir)
        self.parts = sorted(self.folder.glob(f"{split}-part-*.parquet"))
        self.positional = uids_in_order and bool(self.parts)
        self.rows = [pq.ParquetFile(p).metadata.num_rows for p in self.parts]
        self._by_uid: pa.Table | None = None

    def read(self, start: int, stop: int, uids: pa.Array) -> pa.Array:
        if self.positional:
            table = read_row_range([str(p) for p in self.parts], self.rows, start, stop, ["uid", "logps"])
            if table.num_rows == len(uids) and pc.all(pc.equal(table.column("uid"), uids)).as_py():
                return self._checked(table)
            logger.info("%s: uids not in the split's order from row %d; joining by uid", self.folder, start)
            self.positional = False
        return self._join(uids)

    def _join(self, uids: pa.Array) -> pa.Array:
        if self._by_uid is None:  # only for stores not in split order (imported pickles): held as Arrow
            parts = sorted(self.folder.glob("*-part-*.parquet"))
            table = pa.concat_tables([pq.read_table(p, columns=["uid", "logps"]) for p in parts])
            self._by_uid = table.append_column("at", pa.array(np.arange(table.num_rows)))
            if pc.count_distinct(table.column("uid")).as_py() != table.num_rows:
                raise PipelineError(f"{self.folder}: a uid appears more than once in the stored logps")
        wanted = pa.table({"uid": uids, "pos": pa.array(np.arange(len(uids)))})
        joined = wanted.join(self._by_uid.select(["uid", "at"]), "uid", join_type="left outer")
        joined = joined.sort_by("pos")
        logps = self._by_uid.column("logps").take(joined.column("at"))  # a null index gives a null row
        return self._checked(pa.table({"uid": uids, "logps": logps}))

    def _checked(self, table: pa.Table) -> pa.Array:
        bad, first = nonfinite_rows(table.filter(pc.is_valid(table.column("logps"))))
        if bad:
            raise PipelineError(f"{self.folder}: {bad} rows hold logps that are not finite (NaN or inf; first uid "
                                f"{first!r}); check the reference model and recompute them with `pipeline logp`")  # fmt: skip
        return table.column("logps").combine_chunks().cast(pa.list_(pa.float32()))


def store_in_split_order(logp_dir: str, data_path: str, split: str) -> bool:
    """Whether the store was made by `pipeline logp` from this very prepared data (then its parts hold the
    split's rows in order)."""
    manifest = read_json_object(Path(logp_dir) / MANIFEST, "logp_dir")
    prepare = read_json_object(Path(data_path) / MANIFEST, "data_path")
    return manifest.get("prepare_manifest_sha256") == prepare_manifest_sha256(prepare) and split in (
        manifest.get("rows") or {}
    )


# ------------------------------------------------------------------------------------------ building


def build_part(request: ViewRequest, tokenizer, files: list[str], counts: list[int], start: int, stop: int,
               store: StoredLogps | None) -> pa.Table:  # fmt: skip
    """Rows [start, stop) of the split, tokenized and joined with their stored logps."""
    from pipeline.tokenization import parse_prompt, tokenize_prompt_response

    rows = read_row_range(files, counts, start, stop, ["uid", "prompt_pretokenized", request.response_key])
    prompts = [parse_prompt(p) for p in rows.column("prompt_pretokenized").to_pylist()]
    samples = tokenize_prompt_response(
        tokenizer, prompts, rows.column(request.response_key).to_pylist(), request.max_length
    )
    uids = rows.column("uid").combine_chunks()
    response_len = np.array([s.response_len for s in samples], dtype=np.int32)
    columns = {
        "row": pa.array(np.arange(start, stop, dtype=np.int64)),
        "uid": uids,
        "input_ids": pa.array([s.input_ids for s in samples], pa.list_(pa.int32())),
        "prompt_len": pa.array(np.array([s.prompt_len for s in samples], dtype=np.int32)),
        "response_len": pa.array(response_len),
        "truncated": pa.array([s.truncated for s in samples], pa.bool_()),
    }
    if store is not None:
        logps = store.read(start, stop, uids)
        stored = pc.list_value_length(logps).to_numpy(zero_copy_only=False)
        present = logps.is_valid().to_numpy(zero_copy_only=False)
        wrong = np.flatnonzero(present & (stored != response_len))
        if len(wrong):
            i = int(wrong[0])
            raise PipelineError(f"uid {uids[i].as_py()!r}: {response_len[i]} response tokens here but {stored[i]} "
                                "stored logps; the logps were made with other tokenization settings")  # fmt: skip
        columns["ref_logps"] = logps
    return pa.table(columns, schema=view_schema(store is not None))


def _part_path(folder: Path, index: int) -> Path:
    return folder / f"part-{index:05d}.arrow"


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


@contextmanager
def arrow_file_writer(path: Path, schema: pa.Schema):
    """An Arrow IPC stream file (what `datasets` memory-maps), written batch by batch under a temporary
    name and renamed when complete."""
    tmp = _temp_name(path)
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            yield writer
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_dead_temp_files(folder: Path) -> None:
    """Temporary parts of killed builds on this machine (a live process's own are left alone)."""
    host = socket.gethostname()
    for tmp in folder.glob(".part-*.arrow.tmp-*"):
        owner = tmp.name.rsplit(".tmp-", 1)[1]
        name, _, pid = owner.rpartition("-")
        if name != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass


def build_parts(request: ViewRequest, tokenizer, folder: Path, rank: int = 0, world: int = 1,
                progress: bool = True) -> int:  # fmt: skip
    """Build this rank's missing parts (r, r+W, ...). Returns how many it built."""
    from tqdm.auto import tqdm

    files = prepared_shards(request.data_path, "rl", request.split)
    counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
    total = sum(counts)
    parts = -(-total // request.part_rows)
    store = None
    if request.logp_dir:
        in_order = store_in_split_order(request.logp_dir, request.data_path, request.split)
        store = StoredLogps(request.logp_dir, request.split, in_order)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PipelineError(
            f"token_view_dir: cannot create '{folder}' ({err.strerror}); give a writable "
            "folder every process sees"
        ) from None
    remove_dead_temp_files(folder)
    todo = [i for i in range(rank, parts, world) if not _part_path(folder, i).is_file()]
    built = 0
    for index in tqdm(
        todo, desc=f"tokenizing {request.split}", unit="part", disable=not progress or len(todo) < 2
    ):
        if _part_path(folder, index).is_file():  # another process finished it meanwhile
            continue
        start, stop = index * request.part_rows, min(total, (index + 1) * request.part_rows)
        with arrow_file_writer(_part_path(folder, index), view_schema(store is not None)) as writer:
            for lo in range(start, stop, BUILD_BATCH):  # memory bounded by a batch, not by the part
                table = build_part(request, tokenizer, files, counts, lo, min(stop, lo + BUILD_BATCH), store)
                writer.write_table(table, max_chunksize=BUILD_BATCH)
        built += 1
    return built


def finish(folder: Path, identity: dict, rows: int, parts: int) -> dict:
    """Write `view.json` once every part is there."""
    missing = [i for i in range(parts) if not _part_path(folder, i).is_file()]
    if missing:
        raise PipelineError(f"{folder}: tokenized view part {missing[0]} is missing; run again to finish it")
    info = {**identity, "rows": rows, "parts": parts}
    tmp = _temp_name(folder / COMPLETE)
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, folder / COMPLETE)
    return info


def open_parts(folder: Path, parts: int):
    """The view's parts as one memory-mapped `datasets.Dataset`."""
    from datasets import Dataset, concatenate_datasets

    pieces = [Dataset.from_file(str(_part_path(folder, i)), in_memory=False) for i in range(parts)]
    return pieces[0] if len(pieces) == 1 else concatenate_datasets(pieces)


def token_view(request: ViewRequest, tokenizer, state=None) -> TokenView | None:
    """The split's tokenized view: reused when complete, else built (by every process of `state`, an
    accelerate PartialState, in parallel) and then opened memory-mapped. None when the split has no rows."""
    from pipeline.tokenization import tokenizer_fingerprint

    files = prepared_shards(request.data_path, "rl", request.split)
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if not rows:
        return None
    require_columns(files[0], ["uid", "prompt_pretokenized", request.response_key])
    identity = view_identity(request, tokenizer_fingerprint(tokenizer))
    folder = view_folder(request, identity)
    parts = -(-rows // request.part_rows)
    reused = (folder / COMPLETE).is_file()
    if reused:
        logger.info("tokenized view of %s/%s reused from %s", request.data_path, request.split, folder)
    else:
        rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
        built = build_parts(
            request, tokenizer, folder, rank, world, progress=state is None or state.is_local_main_process
        )
        if state is not None:
            state.wait_for_everyone()
        if state is None or state.is_main_process:
            finish(folder, identity, rows, parts)
        if state is not None:
            state.wait_for_everyone()
        logger.info("tokenized view of %s/%s built in %s (%d parts here, %d rows)", request.data_path,
                    request.split, folder, built, rows)  # fmt: skip
    info = json.loads((folder / COMPLETE).read_text())
    return TokenView(folder, rows, info, open_parts(folder, parts), reused)
