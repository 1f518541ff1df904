"""Logp stage: per-token log-probs of every response under the reference model, computed once, stored by uid.

    pipeline logp --data_path data/prepared --model_name_or_path MODEL [--tag ref] [--max_length 2048]
    torchrun --nproc_per_node 8 -m pipeline.cli logp --data_path ... # or scripts/run_logp.sh DATA MODEL TAG
    pipeline logp --import_pickles OLD_DIR --trust_pickles true --output_dir data/prepared_ref_logp  # old pickles

Reads a `pipeline prepare` output (its `rl/{train,eval}` shards and `manifest.json`) and writes
`{data_path}_{tag}_logp/` (or `--output_dir`): `{split}-part-NNNNN.parquet` with `uid`, `logps` (float32 per
response token), `n_tokens`, `sum_logp`, `truncated`, and `manifest.json` (model and tokenizer fingerprints,
max_length, dtype, the prepare manifest). Prompt + response go through `tokenize_prompt_response`, the same
function the training stages use, so stored log-probs line up token for token.

Work is cut into parts of `part_rows` consecutive rows; rank r of W takes parts r, r+W, ...; each part is
written under a temporary name and renamed, so a rerun skips finished parts and recomputes nothing. The
manifest is written last, after every uid was checked to be present exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import data, outputs
from pipeline.configs import parse_stage_args
from pipeline.data import prepared_shards, read_row_range, write_parquet_atomic
from pipeline.errors import PipelineError
from pipeline.logp_store import (
    LOGP_SCHEMA,
    SCHEMA_VERSION,
    model_fingerprint,
    nonfinite_rows,
    prepare_manifest_sha256,
)
from pipeline.models import check_model_dir
from pipeline.runinfo import atomic_write_text

logger = logging.getLogger("pipeline.logp")


@dataclass
class LogpConfig:
    data_path: str | None = field(default=None, metadata={"help": "A `pipeline prepare` output folder."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Reference model (local folder)."})
    output_dir: str | None = field(default=None, metadata={"help": "Default: {data_path}_{tag}_logp."})
    tag: str = field(default="ref", metadata={"help": "Names the default output folder."})
    splits: str = field(default="train,eval", metadata={"help": "Splits of the prepare output to score."})
    max_length: int = field(
        default=2048, metadata={"help": "Prompt + response tokens; responses are cut to fit."}
    )
    token_budget: int = field(
        default=16384,
        metadata={"help": "Padded tokens per forward pass (rows are length-sorted within a part)."},
    )
    lm_head_chunk: int = field(default=1024, metadata={"help": "Tokens per lm_head/log-softmax chunk."})
    packing: bool = field(
        default=False,
        metadata={"help": "Pack samples end to end into rows of `pack_row_tokens` (padding-free; position ids "
                  "restart per sample). Pair with attn_implementation=flex_attention on GPU."},
    )  # fmt: skip
    pack_row_tokens: int = field(default=16384, metadata={"help": "Tokens per packed row (>= max_length)."})
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16."}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, flex_attention."})
    part_rows: int = field(default=4096, metadata={"help": "Rows per part file (the unit of resumption)."})
    max_parts: int | None = field(default=None, metadata={"help": "Stop after this many parts per rank."})
    import_pickles: str | None = field(
        default=None, metadata={"help": "Convert a folder of old per-rank pickles {uid: logps} instead."}
    )
    trust_pickles: bool = field(
        default=False,
        metadata={"help": "Required with import_pickles: unpickling runs whatever code the files hold, so only "
                  "pickles you made yourself may be read."},
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ input rows


@dataclass
class SplitInput:
    name: str
    files: list[str]
    rows: list[int]  # rows per file

    @property
    def total(self) -> int:
        return sum(self.rows)


def read_prepare_output(data_path: str, splits: list[str]) -> tuple[dict, list[SplitInput]]:
    manifest_path = Path(data_path) / "manifest.json"
    if not manifest_path.is_file():
        raise PipelineError(f"{data_path}: no manifest.json; point data_path at a `pipeline prepare` output")
    manifest = json.loads(manifest_path.read_text())
    inputs = []
    for split in splits:
        files = prepared_shards(data_path, "rl", split)
        rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
        inputs.append(SplitInput(split, files, rows))
    if not any(s.total for s in inputs):
        raise PipelineError(f"{data_path}: no rows in rl/{{{','.join(splits)}}}-*.parquet")
    return manifest, inputs


def read_rows(split: SplitInput, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of a split that spans several files, reading only the row groups that hold them."""
    return read_row_range(split.files, split.rows, start, stop, columns)


# ------------------------------------------------------------------------------------------ scoring


def score_part(model, tokenizer, table: pa.Table, response_key: str, cfg: LogpConfig) -> pa.Table:
    import torch

    from pipeline.scoring import pack_rows, packed_response_logps, response_logps, token_budget_batches
    from pipeline.tokenization import parse_prompt, tokenize_prompt_response

    prompts = [parse_prompt(p) for p in table.column("prompt_pretokenized").to_pylist()]
    samples = tokenize_prompt_response(
        tokenizer, prompts, table.column(response_key).to_pylist(), cfg.max_length
    )
    logps: list[np.ndarray | None] = [None] * len(samples)
    lengths = [len(s.input_ids) for s in samples]
    if cfg.packing:
        rows = pack_rows(lengths, cfg.pack_row_tokens)
        per_forward = max(1, cfg.token_budget // cfg.pack_row_tokens)
        for start in range(0, len(rows), per_forward):
            group = rows[start : start + per_forward]
            with torch.inference_mode():
                out = packed_response_logps(model, [[samples[i] for i in row] for row in group],
                                            tokenizer.pad_token_id, cfg.lm_head_chunk)  # fmt: skip
            for i, values in zip([i for row in group for i in row], out, strict=True):
                logps[i] = values.float().cpu().numpy()
    else:
        for batch in token_budget_batches(lengths, cfg.token_budget):
            with torch.inference_mode():
                out = response_logps(
                    model, [samples[i] for i in batch], tokenizer.pad_token_id, cfg.lm_head_chunk
                )
            for i, values in zip(batch, out, strict=True):
                logps[i] = values.float().cpu().numpy()
    return pa.table(
        {
            "uid": table.column("uid"),
            "logps": pa.array([v.astype(np.float32) for v in logps], pa.list_(pa.float32())),
            "n_tokens": pa.array([len(v) for v in logps], pa.int32()),
            "sum_logp": pa.array([float(v.astype(np.float64).sum()) for v in logps], pa.float64()),
            "truncated": pa.array([s.truncated for s in samples]),
        },
        schema=LOGP_SCHEMA,
    )


def part_path(output_dir: Path, split: str, index: int) -> Path:
    return output_dir / f"{split}-part-{index:05d}.parquet"


def _columns(files, kinds: dict[str, pa.DataType]) -> dict[str, pa.Array]:
    """The named columns of the parquet `files`, concatenated (each file read once)."""
    tables = [pq.read_table(f, columns=list(kinds)) for f in files]
    return {name: pa.concat_arrays([t.column(name).combine_chunks() for t in tables]) if tables
            else pa.array([], kind) for name, kind in kinds.items()}  # fmt: skip


def verify_output(output_dir: Path, inputs: list[SplitInput]) -> tuple[dict[str, int], dict[str, int]]:
    """Every input uid present exactly once, and nothing else (compared sorted, in Arrow: no Python object
    per row); (rows per split, rows per split whose response was cut to fit max_length)."""
    counts, truncated = {}, {}
    for split in inputs:
        expected = _columns(split.files, {"uid": pa.string()})["uid"]
        written = _columns(sorted(output_dir.glob(f"{split.name}-part-*.parquet")),
                           {"uid": pa.string(), "truncated": pa.bool_()})  # fmt: skip
        got = written["uid"]
        truncated[split.name] = int(pc.sum(written["truncated"]).as_py() or 0)
        if len(got) != len(expected) or pc.count_distinct(got).as_py() != len(got):
            raise PipelineError(f"{output_dir}: split '{split.name}' has {len(got)} logp rows for "
                                f"{len(expected)} input rows (or repeated uids); rerun to finish it")  # fmt: skip
        in_order = got.take(pc.array_sort_indices(got)), expected.take(pc.array_sort_indices(expected))
        if len(got) and not pc.all(pc.equal(*in_order)).as_py():
            raise PipelineError(f"{output_dir}: split '{split.name}' uids differ from the input's")
        counts[split.name] = len(got)
    return counts, truncated


# ------------------------------------------------------------------------------------------ migration


def import_pickles(source: str, output_dir: Path) -> dict:
    """Old format: one pickle per rank holding {uid: per-token logps}. No tokenizer check is possible."""
    files = sorted(p for p in Path(source).glob("*") if p.suffix in (".pkl", ".pickle", ".pt", ""))
    files = [p for p in files if p.is_file()]
    if not files:
        raise PipelineError(f"import_pickles: no pickle files in '{source}'")
    rows: dict[str, np.ndarray] = {}
    for path in files:
        try:
            with open(path, "rb") as fh:
                content = pickle.load(fh)  # the users' own files from the old pipeline
        except Exception as err:
            raise PipelineError(f"import_pickles: {path}: not a readable pickle ({err})") from None
        if not isinstance(content, dict):
            raise PipelineError(
                f"import_pickles: {path}: expected a dict of uid -> logps, got {type(content).__name__}"
            )
        for uid, values in content.items():
            if hasattr(values, "detach"):  # torch tensors
                values = values.detach().float().cpu().numpy()
            if str(uid) in rows:
                raise PipelineError(f"import_pickles: uid {uid!r} appears in more than one pickle ({path})")
            rows[str(uid)] = np.asarray(values, dtype=np.float32).reshape(-1)
    uids = sorted(rows)
    table = pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            "logps": pa.array([rows[u] for u in uids], pa.list_(pa.float32())),
            "n_tokens": pa.array([len(rows[u]) for u in uids], pa.int32()),
            "sum_logp": pa.array([float(rows[u].astype(np.float64).sum()) for u in uids]),
            "truncated": pa.array([False] * len(uids)),
        },
        schema=LOGP_SCHEMA,
    )
    write_parquet_atomic(table, part_path(output_dir, "imported", 0))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "stage": "logp",
        "imported_from": os.path.abspath(source),
        "source_files": [p.name for p in files],
        "rows": {"imported": len(uids)},
        "tokenizer_fingerprint": None,
        "tokenizer_check": "not possible: imported from per-rank pickles without tokenizer or max_length",
        "model_fingerprint": None,
    }
    atomic_write_text(output_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


# ------------------------------------------------------------------------------------------ main


# the dataclasses a recipe of this stage fills (tests/test_configs.py parses every shipped recipe with them)
CONFIG_CLASSES = (LogpConfig,)


def import_old_pickles(cfg: LogpConfig) -> dict:
    """`--import_pickles`: the old pipeline's pickles into a store, only on `--trust_pickles true`."""
    if not cfg.output_dir:
        raise PipelineError("import_pickles needs --output_dir")
    if not cfg.trust_pickles:
        raise PipelineError(f"import_pickles: reading '{cfg.import_pickles}' unpickles it, which runs any code "
                            "the files hold; if you made these files yourself, pass --trust_pickles true")  # fmt: skip
    return import_pickles(cfg.import_pickles, outputs.claim(cfg.output_dir, "logp"))


def job_of(cfg: LogpConfig, tokenizer, prepare_manifest: dict, inputs, dtype: str) -> dict:
    """What binds the store to its reference, tokenizer, length, dtype and data (the logp contract)."""
    from pipeline.tokenization import tokenizer_fingerprint

    tok_fp = tokenizer_fingerprint(tokenizer)
    if prepare_manifest.get("tokenizer_fingerprint") not in (None, tok_fp):
        raise PipelineError(
            f"{cfg.data_path}: prepared with tokenizer {prepare_manifest['tokenizer_fingerprint']}, but "
            f"{cfg.model_name_or_path} has tokenizer {tok_fp}; rerun prepare with this tokenizer"
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "model_fingerprint": model_fingerprint(cfg.model_name_or_path),
        "tokenizer_fingerprint": tok_fp,
        "max_length": cfg.max_length,
        "dtype": dtype,
        "prepare_manifest_sha256": prepare_manifest_sha256(prepare_manifest),
        "splits": {s.name: s.total for s in inputs},
        "part_rows": cfg.part_rows,
        # equal to 1e-5 either way, but not bit for bit: parts of one output come from one way of scoring
        "packing": cfg.packing,
        "attn_implementation": cfg.attn_implementation,
    }


def start_job(output_dir: Path, job: dict, state) -> None:
    """Refuse a folder holding another job's logps; clear a killed run's unfinished parts; record the job."""
    stale = data.start_job(output_dir, job, state, output_dir, "*-part-*.parquet", "logps",
                           "use another --output_dir or --tag, or delete it")  # fmt: skip
    if stale:
        logger.info("logp: removed %d unfinished part files of an earlier run", len(stale))


def score_parts(
    model, tokenizer, cfg: LogpConfig, inputs, output_dir: Path, state, response_key: str, dtype: str
):
    """This rank's parts not scored yet (round robin over ranks), each written when complete."""
    from tqdm.auto import tqdm

    mine = [(split, index) for split in inputs
            for index in range(state.process_index, -(-split.total // cfg.part_rows), state.num_processes)]  # fmt: skip
    todo = [(split, index) for split, index in mine if not part_path(output_dir, split.name, index).is_file()]
    if cfg.max_parts is not None:
        todo = todo[: cfg.max_parts]
    logger.info("logp rank %d/%d: %d parts to score, %d finished earlier", state.process_index,
                state.num_processes, len(todo), len(mine) - len(todo))  # fmt: skip
    bar = tqdm(total=len(todo), desc=f"logp rank {state.process_index}", unit="part",
               disable=not state.is_local_main_process)  # fmt: skip
    tokens, started = 0, time.time()
    for split, index in todo:
        start = index * cfg.part_rows
        rows = read_rows(split, start, min(split.total, start + cfg.part_rows),
                         ["uid", "prompt_pretokenized", response_key])  # fmt: skip
        part = score_part(model, tokenizer, rows, response_key, cfg)
        bad, first = nonfinite_rows(part)
        if bad:  # a broken reference: nothing of it is stored, and the run stops here
            raise PipelineError(f"logp: {bad} of {part.num_rows} rows of {split.name} part {index} got logps that "
                                f"are not finite (NaN or inf; first uid {first!r}); check the reference model "
                                f"'{cfg.model_name_or_path}' (a broken checkpoint?) and its dtype ({dtype})")  # fmt: skip
        write_parquet_atomic(part, part_path(output_dir, split.name, index))
        tokens += pc.sum(part.column("n_tokens")).as_py() or 0
        bar.update(1)
        bar.set_postfix(resp_tokens_per_s=f"{tokens / max(time.time() - started, 1e-9):.0f}")
    bar.close()


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = parse_stage_args(CONFIG_CLASSES, argv, "logp")
    if cfg.import_pickles:
        return import_old_pickles(cfg)
    if not cfg.data_path:
        raise PipelineError("data_path is required (a `pipeline prepare` output)")
    check_model_dir(cfg.model_name_or_path)
    splits = [s.strip() for s in cfg.splits.split(",") if s.strip()]
    prepare_manifest, inputs = read_prepare_output(cfg.data_path, splits)
    if not cfg.output_dir:
        outputs.check_name(cfg.tag, "tag")
    output_dir = outputs.claim(cfg.output_dir or f"{cfg.data_path.rstrip('/')}_{cfg.tag}_logp", "logp")

    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.scoring import check_scorable

    # on a machine without CUDA, ranks started by torchrun still form a (gloo) process group
    state = PartialState(cpu=not torch.cuda.is_available())
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if state.device.type == "cuda" else "float32"
    with state.main_process_first():  # one rank hashes the reference; the others read the hash cache
        job = job_of(cfg, tokenizer, prepare_manifest, inputs, dtype)
    start_job(output_dir, job, state)

    model = AutoModelForCausalLM.from_pretrained(
        cfg.model_name_or_path, dtype=getattr(torch, dtype), attn_implementation=cfg.attn_implementation
    ).to(state.device)
    model.eval()
    check_scorable(model)
    response_key = prepare_manifest.get("columns", {}).get("response", "unprocessed_response")
    score_parts(model, tokenizer, cfg, inputs, output_dir, state, response_key, dtype)
    state.wait_for_everyone()

    manifest = {}
    if state.is_main_process and (cfg.max_parts is None or all(
        part_path(output_dir, s.name, i).is_file() for s in inputs for i in range(-(-s.total // cfg.part_rows))
    )):  # fmt: skip
        counts, truncated = verify_output(output_dir, inputs)
        manifest = {**job, "stage": "logp", "config": asdict(cfg), "rows": counts, "truncated": truncated,
                    "response_column": response_key, "prepare_manifest": prepare_manifest,
                    "world_size": state.num_processes}  # fmt: skip
        atomic_write_text(output_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        logger.info("logp: %s rows scored into %s", counts, output_dir)
        if any(truncated.values()):
            logger.warning("logp: responses cut to fit max_length %d (prompt + response tokens): %s rows",
                           cfg.max_length, truncated)  # fmt: skip
    state.wait_for_everyone()
    return manifest
