"""The stored reference log-probs (`pipeline logp` output) and the contract every consumer checks.

A store is a folder of `{split}-part-NNNNN.parquet` files (`LOGP_SCHEMA`: uid, per-token `logps`, n_tokens,
sum_logp, truncated) and a `manifest.json` that binds the numbers to what produced them:

    model_fingerprint       sha256 over the reference's config.json and weight files
    tokenizer_fingerprint   vocabulary, special tokens and chat template (`tokenization.tokenizer_fingerprint`)
    max_length              prompt + response tokens (responses were cut to fit)
    dtype                   the compute dtype of the scoring forward (float32, bfloat16)
    prepare_manifest_sha256 the identity of the prepared rows scored (their `manifest.json`, which names
                            the sources' sha256, the config and the row counts); `rows` per split
    response_column         the prepared column that was scored

`check_contract` compares all of it with the consuming run (IPS, DPO) before its first step and refuses a
difference in one line naming the field, both values and the `pipeline logp` command that fixes it. Only a
dtype difference can be allowed (`allow_logp_dtype_mismatch: true`): bf16 logps of the right model are
noisy, not wrong. Stores imported from the old per-rank pickles carry no binding: they are accepted with a
warning, and the per-row token count check and IPS's step-0 mismatch check are what guard them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import cached_sha256, prepared_shards, read_json_object
from pipeline.errors import PipelineError

logger = logging.getLogger("pipeline.logp_store")

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LOGP_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("logps", pa.list_(pa.float32())),
        ("n_tokens", pa.int32()),
        ("sum_logp", pa.float64()),
        ("truncated", pa.bool_()),
    ]
)
# prepare manifest fields that change on every run and say nothing about the rows
VOLATILE_PREPARE_FIELDS = ("seconds", "seconds_by_pass")


def model_fingerprint(model_dir: str) -> str:
    """Hash of config.json and the weight files: two runs agree only on the very same reference model. A
    LoRA adapter's: its adapter_config.json and weights, and its base model's fingerprint."""
    folder = Path(model_dir)
    weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    config = folder / "config.json"
    adapter = folder / "adapter_config.json"
    if adapter.is_file() and not config.is_file():
        config = adapter
    if not weights or not config.is_file():
        raise PipelineError(f"model_name_or_path '{model_dir}' has no config.json or weight files")
    listing = "".join(f"{p.name}:{cached_sha256(p)}\n" for p in sorted([config, *weights]))
    if config == adapter:
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise PipelineError(f"LoRA adapter '{model_dir}': its base model '{base}' is not a local folder")
        listing += f"base:{model_fingerprint(base)}\n"
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def prepare_manifest_sha256(manifest: dict) -> str:
    """The identity of a `pipeline prepare` output: the sha256 of its manifest (canonical JSON)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def split_rows(data_path: str, split: str) -> int:
    """Rows of a prepared split's rl view, from the parquet footers."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in prepared_shards(data_path, "rl", split))


def read_store_manifest(logp_dir: str | Path, key: str) -> dict:
    path = Path(logp_dir) / MANIFEST
    if not path.is_file():
        raise PipelineError(f"{key} '{logp_dir}': no {MANIFEST} (not a finished `pipeline logp` output); "
                            "run `pipeline logp` first")  # fmt: skip
    return read_json_object(path, key)


# ------------------------------------------------------------------------------------------ the contract


@dataclass
class Expected:
    """What the consuming run will compute its own log-probs with."""

    data_path: str
    reference: str  # the reference model folder (for the fix command and messages)
    tokenizer_fingerprint: str
    max_length: int | None
    dtype: str
    splits: tuple[str, ...] = ("train", "eval")


def logp_command(expected: Expected) -> str:
    """The `pipeline logp` command that makes a store for this run (into a new folder)."""
    parts = ["pipeline", "logp", "--data_path", expected.data_path, "--model_name_or_path", expected.reference,
             "--max_length", str(expected.max_length), "--dtype", expected.dtype, "--output_dir", "NEW_DIR"]  # fmt: skip
    return " ".join(shlex.quote(p) for p in parts)


def _prepare_difference(stored: dict | None, current: dict) -> str:
    """Which fields of the prepare manifest differ (for the message)."""
    if not isinstance(stored, dict):
        return "unknown fields"
    keys = sorted((set(stored) | set(current)) - set(VOLATILE_PREPARE_FIELDS))
    changed = [k for k in keys if stored.get(k) != current.get(k)]
    return ", ".join(changed) if changed else "timings only: prepare was run again"


def contract_problems(manifest: dict, expected: Expected) -> list[tuple[str, str]]:
    """(field, 'X there, Y here') for every binding that differs; dtype among them."""
    problems: list[tuple[str, str]] = []

    def differs(field: str, there, here, shown_there=None, shown_here=None) -> None:
        if there != here:
            problems.append((field, f"{shown_there or there} there, {shown_here or here} here"))

    differs("tokenizer", manifest.get("tokenizer_fingerprint"), expected.tokenizer_fingerprint)
    differs("max_length", manifest.get("max_length"), expected.max_length)
    ref_fp = model_fingerprint(expected.reference)
    differs("reference model", manifest.get("model_fingerprint"), ref_fp,
            shown_here=f"{ref_fp} ({expected.reference})")  # fmt: skip
    differs("dtype", manifest.get("dtype"), expected.dtype)
    current = read_json_object(Path(expected.data_path) / MANIFEST, "data_path")
    there, here = manifest.get("prepare_manifest_sha256"), prepare_manifest_sha256(current)
    if there != here:
        problems.append(("prepared data", f"prepare manifest {str(there)[:12]} there, {here[:12]} here; "
                         f"differs in {_prepare_difference(manifest.get('prepare_manifest'), current)}"))  # fmt: skip
    stored_rows = manifest.get("rows") or {}
    for split in expected.splits:
        if split in stored_rows:
            differs(f"rows of {split}", stored_rows[split], split_rows(expected.data_path, split))
    return problems


def check_contract(
    logp_dir: str | Path, key: str, manifest: dict, expected: Expected, allow_dtype_mismatch: bool
) -> dict:
    """Refuse a store that does not belong to this run; returns what run.json records about it.

    One line per refusal: what differs, both values, and the command that makes the right store."""
    if manifest.get("model_fingerprint") is None and manifest.get("tokenizer_fingerprint") is None:
        logger.warning("%s was imported from old pickles: its model, tokenizer, max_length and data cannot be "
                       "checked; the token count of every row and the step-0 mismatch are", logp_dir)  # fmt: skip
        return {"logp_dir": str(logp_dir), "bound": False}
    problems = contract_problems(manifest, expected)
    allowed = [p for p in problems if p[0] == "dtype" and allow_dtype_mismatch]
    refused = [p for p in problems if p not in allowed]
    if refused:
        field, values = refused[0]
        more = f" (also: {', '.join(f for f, _ in refused[1:])})" if len(refused) > 1 else ""
        hint = " (or pass --allow_logp_dtype_mismatch true)" if field == "dtype" and len(refused) == 1 else ""
        raise PipelineError(f"{key} '{logp_dir}': the stored logps were made with another {field} ({values}){more}; "
                            f"make the right ones with `{logp_command(expected)}`, then pass --{key} NEW_DIR"
                            f"{hint}")  # fmt: skip
    record = {"logp_dir": str(logp_dir), "bound": True, "dtype": manifest.get("dtype")}
    if allowed:
        record["dtype_mismatch_allowed"] = allowed[0][1]
        logger.warning("logps of another dtype (%s) used as allow_logp_dtype_mismatch says", allowed[0][1])
    return record


# ------------------------------------------------------------------------------------------ reading


def nonfinite_rows(table: pa.Table) -> tuple[int, str | None]:
    """(rows whose logps hold a NaN or infinity, the first such row's uid)."""
    column = table.column("logps").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    bad_values = ~np.isfinite(values)
    if not bad_values.any():
        return 0, None
    offsets = column.offsets.to_numpy()
    owner = np.searchsorted(offsets, np.flatnonzero(bad_values), side="right") - 1 - column.offset
    rows = np.unique(owner)
    return len(rows), table.column("uid")[int(rows[0])].as_py()


def read_logps(logp_dir: str | Path) -> dict[str, np.ndarray]:
    """{uid: per-token logps} of a store; a store with a NaN/inf value is refused in one line."""
    parts = sorted(Path(logp_dir).glob("*-part-*.parquet"))
    if not parts:
        raise PipelineError(f"{logp_dir}: no part files; rerun `pipeline logp`")
    table = pa.concat_tables([pq.read_table(p, columns=["uid", "logps"]) for p in parts])
    bad, first = nonfinite_rows(table)
    if bad:
        raise PipelineError(f"{logp_dir}: {bad} rows hold logps that are not finite (NaN or inf; first uid "
                            f"{first!r}); check the reference model and recompute them with `pipeline logp`")  # fmt: skip
    return dict(
        zip(
            table.column("uid").to_pylist(), table.column("logps").to_numpy(zero_copy_only=False), strict=True
        )
    )


def training_dtype(training_args, model_args) -> str:
    """The dtype a training stage computes its log-probs in: the loaded weights' dtype, or the autocast
    (bf16/fp16 mixed precision) it runs under."""
    if model_args.dtype in ("bfloat16", "float16"):
        return model_args.dtype
    if getattr(training_args, "bf16", False):
        return "bfloat16"
    if getattr(training_args, "fp16", False):
        return "float16"
    if model_args.dtype == "auto":
        config = Path(model_args.model_name_or_path) / "config.json"
        if config.is_file():
            stored = json.loads(config.read_text())
            return str(stored.get("dtype") or stored.get("torch_dtype") or "float32")
    return "float32"
