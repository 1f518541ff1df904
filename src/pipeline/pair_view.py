"""Preference pairs of a prepared split as token ids, for DPO: built from the split's tokenized view
(`pipeline.token_view`) and cached beside it as one memory-mapped Arrow file.

Each pair of `pairs/{split}` (chosen_uid, rejected_uid) becomes a row of

    prompt_ids, chosen_ids, rejected_ids    list<int32>   (TRL's DPO input once tokenized)
    prompt_id, chosen_row                   uint64, int64 the prompt and the chosen row (`max_train_samples`
                                                          keeps pairs in `sampling.nested_ids_order`)
    ref_chosen_logps, ref_rejected_logps    float64       the reference's summed logps (with a logp store)

The uids are matched to rows of the view by one Arrow hash join; the pairs are then written a chunk at a
time, so no Python object per pair is kept. The summed reference logps are TRL's own sum: all response
tokens, or with LD-DPO's `ld_alpha` the first `shared` tokens (the shorter response's length) plus
ld_alpha × the rest — hence `ld_alpha` is part of the file's name.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import prepared_shards, read_prepared_split
from pipeline.errors import PipelineError
from pipeline.token_view import TokenView, arrow_file_writer

logger = logging.getLogger("pipeline.pair_view")
CHUNK = 4096  # pairs gathered and written at a time


def reference_sum(token_logps, shared: int, ld_alpha: float | None) -> float:
    """A response's reference log-prob as TRL's DPO sums its own: all tokens, or with LD-DPO's `ld_alpha` the
    first `shared` tokens (the shorter response's length) plus ld_alpha × the rest."""
    values = np.asarray(token_logps, dtype=np.float64)
    if ld_alpha is None:
        return float(values.sum())
    return float(values[:shared].sum() + ld_alpha * values[shared:].sum())


def pair_schema(with_logps: bool) -> pa.Schema:
    ids = pa.list_(pa.int32())
    fields = [("prompt_ids", ids), ("chosen_ids", ids), ("rejected_ids", ids), ("prompt_id", pa.uint64()),
              ("chosen_row", pa.int64())]  # fmt: skip
    if with_logps:
        fields += [("ref_chosen_logps", pa.float64()), ("ref_rejected_logps", pa.float64())]
    return pa.schema(fields)


def pair_rows(data_path: str, split: str, view: TokenView) -> tuple[np.ndarray, np.ndarray] | None:
    """(chosen rows, rejected rows) of the view for the split's pairs, in the pairs view's order."""
    files = prepared_shards(data_path, "pairs", split)
    if not files:
        return None
    pairs = pa.concat_tables([pq.read_table(f, columns=["chosen_uid", "rejected_uid"]) for f in files])
    index = pa.table({"uid": view.dataset.data.column("uid"), "at": pa.array(np.arange(view.rows))})
    found = []
    for side in ("chosen_uid", "rejected_uid"):
        wanted = pa.table({"uid": pairs.column(side), "pos": pa.array(np.arange(pairs.num_rows))})
        joined = wanted.join(index, "uid", join_type="left outer").sort_by("pos")
        at = joined.column("at")
        if at.null_count:
            first = joined.column("uid")[int(np.flatnonzero(at.is_null().to_numpy())[0])].as_py()
            raise PipelineError(f"{data_path}: pairs/{split} names uid {first!r}, which its rl/{split} view lacks; "
                                "re-run `pipeline prepare` into a fresh output_dir")  # fmt: skip
        if joined.num_rows != pairs.num_rows:
            raise PipelineError(f"{data_path}: a uid appears more than once in rl/{split}")
        found.append(at.to_numpy())
    return found[0], found[1]


def _pair_chunk(view: TokenView, chosen: np.ndarray, rejected: np.ndarray, with_logps: bool,
                ld_alpha: float | None, logp_dir: str | None, split: str, prompt_ids: np.ndarray) -> pa.Table:  # fmt: skip
    columns = ["uid", "input_ids", "prompt_len", "response_len"] + (["ref_logps"] if with_logps else [])
    needed = view.dataset.select_columns(columns)
    good, bad = needed[chosen.tolist()], needed[rejected.tolist()]
    out: dict[str, list] = {name: [] for name in pair_schema(with_logps).names}
    out["prompt_id"], out["chosen_row"] = prompt_ids[chosen].tolist(), chosen.tolist()
    for i in range(len(chosen)):
        p, q = good["prompt_len"][i], bad["prompt_len"][i]
        out["prompt_ids"].append(good["input_ids"][i][:p])
        out["chosen_ids"].append(good["input_ids"][i][p:])
        out["rejected_ids"].append(bad["input_ids"][i][q:])
        if not with_logps:
            continue
        for side in (good, bad):
            if side["ref_logps"][i] is None:
                raise PipelineError(f"{logp_dir}: no stored logps for uid {side['uid'][i]!r} ({split} pairs); "
                                    "run `pipeline logp` on this prepare output")  # fmt: skip
        shared = min(good["response_len"][i], bad["response_len"][i])
        out["ref_chosen_logps"].append(reference_sum(good["ref_logps"][i], shared, ld_alpha))
        out["ref_rejected_logps"].append(reference_sum(bad["ref_logps"][i], shared, ld_alpha))
    return pa.table(out, schema=pair_schema(with_logps))


def pair_view(data_path: str, split: str, view: TokenView, ld_alpha: float | None, logp_dir: str | None = None,
              state=None):  # fmt: skip
    """The split's pairs as a memory-mapped `datasets.Dataset` (None without a pairs view); built once into
    the view's folder by the main process, then reused by every rank and restart."""
    from datasets import Dataset

    with_logps = "ref_logps" in view.dataset.column_names
    files = prepared_shards(data_path, "pairs", split)
    if not files:
        return None
    identity = {"format": 2, "pairs": [Path(f).name for f in files], "ld_alpha": ld_alpha}
    key = hashlib.sha256(json.dumps(identity).encode())
    path = view.folder / f"dpo-pairs-{key.hexdigest()[:12]}.arrow"
    main = state is None or state.is_main_process
    if not path.is_file() and main:
        chosen, rejected = pair_rows(data_path, split, view)
        prompt_ids = read_prepared_split(data_path, "rl", split, ["prompt_id"]).column(0).to_numpy()
        with arrow_file_writer(path, pair_schema(with_logps)) as writer:
            for i in range(0, len(chosen), CHUNK):
                chunk = _pair_chunk(view, chosen[i : i + CHUNK], rejected[i : i + CHUNK], with_logps, ld_alpha,
                                    logp_dir, split, prompt_ids)  # fmt: skip
                writer.write_table(chunk, max_chunksize=1024)
        logger.info("dpo pairs of %s/%s: %d written to %s", data_path, split, len(chosen), path)
    elif path.is_file():
        logger.info("dpo pairs of %s/%s reused from %s", data_path, split, path)
    if state is not None:
        state.wait_for_everyone()
    return Dataset.from_file(str(path), in_memory=False)


def first_pairs(dataset, n: int | None):
    """The first `n` pairs in the nested prompt-by-prompt order (`max_train_samples`), or all."""
    from pipeline.sampling import nested_ids_order

    if dataset is None or not n or n >= len(dataset):
        return dataset
    order = nested_ids_order(
        dataset.data.column("prompt_id").to_numpy(), dataset.data.column("chosen_row").to_numpy()
    )
    return dataset.select(order[:n], keep_in_memory=True)
