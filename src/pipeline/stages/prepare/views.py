"""Pass 2: the rl, sft and early pairs views, written shard by shard."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import PipelineError
from pipeline.stages.prepare.clean import (
    chat_array,
    clean_responses,
    load_tokenizer,
    prompt_parts,
    token_lengths,
)
from pipeline.stages.prepare.config import PROMPT_KEY, PrepareConfig, raw_column_name
from pipeline.stages.prepare.pairs import pair_table
from pipeline.stages.prepare.read import first_null, iter_batches
from pipeline.stages.prepare.shards import ShardWriter

logger = logging.getLogger("pipeline.prepare")


@dataclass
class RowPlan:
    """Pass 1's decisions, one entry per input row (a few bytes each)."""

    keep: np.ndarray
    rewards: np.ndarray
    prompt_keys: np.ndarray
    is_eval: np.ndarray


@dataclass
class ViewsJob:
    cfg: PrepareConfig
    views: list[str]
    tmp: str
    prefix: str  # shard-name prefix of this worker
    units: list[tuple[str, int | None, int, int]]  # (file, row group or None, first global row, rows)
    plan: RowPlan
    # pairs (chosen rows, rejected rows; global, ordered by first row) starting in these units, or None;
    # those whose two rows fall in one read batch are written here, the rest in pass 3
    pairs: tuple[np.ndarray, np.ndarray] | None = None


def write_views(job: ViewsJob, progress: tuple = (None, None)) -> dict:
    """Pass 2 over this job's rows: clean responses, drop too-long rows, write the rl and sft shards and the
    pairs whose two rows are in one batch.

    Returns rows written per view and split, the global indices of the rows too long to keep, and which of
    `job.pairs` were written (logged data keeps a prompt's responses together, so most pairs are)."""
    from tqdm.auto import tqdm

    cfg, tmp, plan = job.cfg, Path(job.tmp), job.plan
    tokenizer = None
    if cfg.tokenizer_name_or_path and cfg.max_length is not None:
        tokenizer = load_tokenizer(cfg.tokenizer_name_or_path)
    writers = {(view, split): ShardWriter(tmp / view, split, cfg, job.prefix)
               for view in ("rl", "sft", "pairs") for split in ("train", "eval")}  # fmt: skip
    too_long_rows = []
    good, bad = job.pairs if job.pairs is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    first, last = np.minimum(good, bad), np.maximum(good, bad)
    pairs_written = []
    desc, total = progress
    bar = tqdm(total=total, desc=desc, unit="row", disable=desc is None or (total or 0) < 100_000)
    for path, group, first_row, _ in job.units:
        offset = first_row
        for batch in iter_batches(path, cfg.batch_rows, row_groups=None if group is None else [group]):
            n = batch.num_rows
            sl = slice(offset, offset + n)
            offset += n
            bar.update(n)
            mask = plan.keep[sl].copy()
            response_col = batch.column(cfg.response_key)
            if response_col.null_count:
                at = first_null(response_col)
                raise PipelineError(f"{path}: column '{cfg.response_key}' is null at row {sl.start + at}, "
                                    f"uid {batch.column('uid')[at]}")  # fmt: skip
            rows = np.flatnonzero(mask)
            if not len(rows):
                continue
            selected = pa.Table.from_batches([batch])
            if len(rows) < n:
                selected = selected.take(pa.array(rows))
            del batch, response_col
            responses = clean_responses(selected.column(cfg.response_key))
            if tokenizer is not None:
                prompts = selected.column(PROMPT_KEY).to_pylist()
                long = token_lengths(tokenizer, prompts, responses.to_pylist()) > cfg.max_length
                too_long_rows.append(rows[long] + sl.start)
                mask[rows[long]] = False
                selected, responses = selected.filter(pa.array(~long)), responses.filter(pa.array(~long))
                if not mask.any():
                    continue
            selected = _output_columns(
                selected, responses, cfg, plan.rewards[sl][mask], plan.prompt_keys[sl][mask]
            )
            a, b = np.searchsorted(first, [sl.start, sl.stop])
            inside = np.flatnonzero(last[a:b] < sl.stop) + a  # pairs with both rows in this batch
            if len(inside):
                pairs_written.append(inside)
                _write_pairs(writers, selected, job, good[inside], bad[inside], rows, sl.start)
            _write_rl_and_sft(writers, selected, job, plan.is_eval[sl][mask])
    bar.close()
    for writer in writers.values():
        writer.close()
    too_long = np.concatenate(too_long_rows) if too_long_rows else np.zeros(0, dtype=np.int64)
    written = np.concatenate(pairs_written) if pairs_written else np.zeros(0, dtype=np.int64)
    return {"rows": {f"{view}_{split}": w.rows for (view, split), w in writers.items()}, "too_long": too_long,
            "pairs_written": written}  # fmt: skip


def _output_columns(
    selected: pa.Table, responses: pa.Array, cfg: PrepareConfig, rewards, prompt_ids
) -> pa.Table:
    """The cleaned responses in place, the input's own reward column renamed aside, the mapped reward and
    the prompt id appended."""
    selected = selected.set_column(
        selected.schema.get_field_index(cfg.response_key), cfg.response_key, responses
    )
    if cfg.reward_output_key in selected.column_names:  # the input's column keeps its values, renamed
        names = selected.column_names
        names[names.index(cfg.reward_output_key)] = raw_column_name(cfg)
        selected = selected.rename_columns(names)
    selected = selected.append_column(cfg.reward_output_key, pa.array(rewards))
    return selected.append_column("prompt_id", pa.array(prompt_ids))


def _write_pairs(writers: dict, selected: pa.Table, job: ViewsJob, good, bad, rows, start: int) -> None:
    """Pairs whose chosen (`good`) and rejected (`bad`) global rows are both in this batch; `rows` are the
    batch's kept rows (relative to `start`), in the order of `selected`."""
    plan = job.plan
    at_good = np.searchsorted(rows, good - start)
    at_bad = np.searchsorted(rows, bad - start)
    for split, held_out in (("train", False), ("eval", True)):
        mine = plan.is_eval[good] == held_out
        if mine.any():
            writers["pairs", split].write(pair_table(
                selected, job.cfg, at_good[mine], at_bad[mine], plan.rewards[good[mine]], plan.rewards[bad[mine]],
            ))  # fmt: skip


def _write_rl_and_sft(writers: dict, selected: pa.Table, job: ViewsJob, eval_rows) -> None:
    """The batch's kept rows into the rl view, and those above the positive threshold as chats into sft."""
    cfg = job.cfg
    for split, split_mask in (("train", ~eval_rows), ("eval", eval_rows)):
        part = selected.filter(pa.array(split_mask))
        if "rl" in job.views:
            writers["rl", split].write(part)
        if "sft" in job.views:
            pos = part.filter(pc.greater(part.column(cfg.reward_output_key), cfg.pos_threshold))
            if pos.num_rows:
                user, prefix = prompt_parts(pos.column(PROMPT_KEY))
                answer = pc.binary_join_element_wise(prefix, pos.column(cfg.response_key), "")
                messages = chat_array([("user", user), ("assistant", answer)])
                writers["sft", split].write(pa.table({
                    "uid": pos.column("uid"), "messages": messages,
                    cfg.reward_output_key: pos.column(cfg.reward_output_key),
                }))  # fmt: skip
