"""`pipeline prepare`: parse → scan (pass 1) → transform, filter, split → views (pass 2) → pairs (pass 3) →
manifest. The stage's documentation is the package's (`pipeline.stages.prepare`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import outputs
from pipeline.configs import parse_stage_args
from pipeline.data import cached_sha256, prepared_shards, resolve_files
from pipeline.errors import PipelineError
from pipeline.models import check_model_dir
from pipeline.runinfo import atomic_write_text
from pipeline.stages.prepare.clean import load_tokenizer
from pipeline.stages.prepare.config import PAIRS_PER_BUCKET, SCHEMA_VERSION, PrepareConfig, raw_reward_column
from pipeline.stages.prepare.pairs import GatherJob, ScatterJob, choose_pairs, gather_pairs, scatter_pair_rows
from pipeline.stages.prepare.parallel import run_jobs, run_shared, split_evenly, work_units, worker_pool
from pipeline.stages.prepare.read import check_schema, open_sources
from pipeline.stages.prepare.scan import scan_rows
from pipeline.stages.prepare.transform import apply_datafilter, parse_clip, split_of, transform_rewards
from pipeline.stages.prepare.views import RowPlan, ViewsJob, write_views

logger = logging.getLogger("pipeline.prepare")

# the dataclasses a recipe of this stage fills (tests/test_configs.py parses every shipped recipe with them)
CONFIG_CLASSES = (PrepareConfig,)


def check_config(cfg: PrepareConfig) -> set[str]:
    """Every setting checked before any input is read; returns the views asked for."""
    views = {v.strip() for v in cfg.views.split(",") if v.strip()}
    if not views <= {"rl", "sft", "pairs"} or not views:
        raise PipelineError(f"views must be a comma-separated subset of rl,sft,pairs, got {cfg.views!r}")
    if cfg.reward_clip:
        parse_clip(cfg.reward_clip)
    if not 0 <= cfg.eval_fraction < 1:
        raise PipelineError(f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.max_text_bytes < 1:
        raise PipelineError(f"max_text_bytes must be >= 1, got {cfg.max_text_bytes}")
    if cfg.max_length is not None and not cfg.tokenizer_name_or_path:
        raise PipelineError("max_length needs tokenizer_name_or_path (the length is counted in its tokens)")
    if Path(cfg.output_dir).exists() and not (cfg.overwrite or cfg.reuse):
        raise PipelineError(f"output_dir '{cfg.output_dir}' exists; choose another or pass --overwrite true")
    return views


def tokenizer_fingerprint_of(cfg: PrepareConfig) -> str | None:
    """The fingerprint of `tokenizer_name_or_path` (recorded so that logp can check it), or None."""
    if not cfg.tokenizer_name_or_path:
        return None
    from pipeline.tokenization import tokenizer_fingerprint

    check_model_dir(cfg.tokenizer_name_or_path, "tokenizer_name_or_path")
    try:
        tokenizer = load_tokenizer(cfg.tokenizer_name_or_path)
    except Exception as err:
        raise PipelineError(
            f"tokenizer_name_or_path '{cfg.tokenizer_name_or_path}': cannot load ({err})"
        ) from None
    return tokenizer_fingerprint(tokenizer)


def plan_rows(index, cfg: PrepareConfig) -> tuple[RowPlan, dict[str, int]]:
    """Each row's fate after pass 1: duplicates and oversized text out, rewards transformed, the datafilter
    applied, the prompt-hash split; with the drops per reason."""
    drops: dict[str, int] = {"duplicate_uid": int(index.duplicate.sum()),
                             "text_too_large": int((index.too_large & ~index.duplicate).sum())}  # fmt: skip
    keep = ~index.duplicate & ~index.too_large
    rewards = transform_rewards(index, keep, cfg)
    kept = apply_datafilter(index, rewards, keep, cfg)
    drops[f"datafilter_{cfg.datafilter}"] = int(keep.sum() - kept.sum())
    return RowPlan(kept, rewards, index.prompt_keys, split_of(index.prompt_keys, cfg.eval_fraction)), drops


def shard_prefixes(num_proc: int) -> list[str]:
    """Per-process shard name prefixes, zero-padded so that the shards sort in row order."""
    return [f"w{k:03d}-" if num_proc > 1 else "" for k in range(num_proc)]


def write_all_views(cfg, views, tmp: Path, pool, num_proc: int, units, plan: RowPlan, rows_in: int):
    """Pass 2 in `num_proc` processes: the rl/sft views and the pairs whose two rows one batch holds.
    Returns (rows written per view and split, rows too long, the pairs still to write as (good, bad), the
    number of pairs chosen here: 0 unless they are known now)."""
    prefixes = shard_prefixes(num_proc)
    # pairs whose rows are far apart are read back from the rl view's cleaned rows in pass 3: written aside
    # when not asked for
    written = sorted(views | ({"rl"} if "pairs" in views else set()))
    # without a length filter the pairs are known now (ids and rewards alone), and pass 2 writes those whose
    # two rows it reads together
    early = "pairs" in views and cfg.max_length is None
    good, bad = choose_pairs(plan.prompt_keys, plan.rewards, plan.keep, cfg) if early else (None, None)
    jobs = []
    for k, part in enumerate(split_evenly(units, num_proc)):
        share = None
        if early:
            lo, hi = np.searchsorted(np.minimum(good, bad), [part[0][2], part[-1][2] + part[-1][3]])
            share = (good[lo:hi], bad[lo:hi])
        jobs.append(ViewsJob(cfg, written, str(tmp), prefixes[k], part, plan, share))
    results = run_jobs(write_views, jobs, pool, "prepare", rows_in)
    rows_out = {key: sum(r["rows"][key] for r in results) for key in results[0]["rows"]}
    too_long = np.concatenate([r["too_long"] for r in results])
    if early:  # the pairs pass 2 did not write
        done = np.zeros(len(good), dtype=bool)
        first_pair = 0
        for job, result in zip(jobs, results, strict=True):
            done[result["pairs_written"] + first_pair] = True
            first_pair += len(job.pairs[0])
        chosen = len(good)
        good, bad = good[~done], bad[~done]
        return rows_out, too_long, (good, bad), chosen
    return rows_out, too_long, (good, bad), 0


def write_late_pairs(cfg, tmp: Path, pool, num_proc: int, plan: RowPlan, good, bad) -> dict[str, int]:
    """Pass 3, as a join that reads the rl shards once: (a) each process streams its share of the rl row
    groups and appends every paired row to its pair's bucket file, (b) each bucket of PAIRS_PER_BUCKET pairs
    is assembled from its files and written. Returns the pairs written per split."""
    prefixes = shard_prefixes(num_proc)
    work = tmp / ".pairs-work"
    work.mkdir()
    scatter_jobs, gather_jobs = [], []
    keep, rewards, is_eval = plan.keep, plan.rewards, plan.is_eval
    for split, held_out in (("train", False), ("eval", True)):
        mine = np.flatnonzero(is_eval[good] == held_out)
        if not len(mine):
            continue
        position = np.cumsum(keep & (is_eval == held_out)) - 1  # row -> index in the split's rl
        g, b = position[good[mine]], position[bad[mine]]
        g_reward, b_reward = rewards[good[mine]], rewards[bad[mine]]
        bucket = np.arange(len(mine)) // PAIRS_PER_BUCKET
        rows = np.concatenate([g, b])
        by_row = np.argsort(rows)
        rows, row_bucket = rows[by_row], np.concatenate([bucket, bucket])[by_row]
        units = work_units([(f, None, 0) for f in prepared_shards(tmp, "rl", split)])
        for k, part in enumerate(split_evenly(units, num_proc)):
            lo, hi = np.searchsorted(rows, [part[0][2], part[-1][2] + part[-1][3]])
            scatter_jobs.append(ScatterJob(cfg, str(work), f"w{k:03d}", split, part, rows[lo:hi],
                                           row_bucket[lo:hi]))  # fmt: skip
        cuts = [slice(i * PAIRS_PER_BUCKET, (i + 1) * PAIRS_PER_BUCKET) for i in range(bucket[-1] + 1)]
        for k, share in enumerate(split_evenly(list(enumerate(cuts)), num_proc)):
            buckets = [(i, g[c], b[c], g_reward[c], b_reward[c]) for i, c in share]
            gather_jobs.append(GatherJob(cfg, str(tmp), str(work), prefixes[k], split, buckets))
    run_shared(scatter_pair_rows, scatter_jobs, pool, num_proc - 1)
    written = {"train": 0, "eval": 0}
    for job, pairs in zip(
        gather_jobs, run_shared(gather_pairs, gather_jobs, pool, num_proc - 1), strict=True
    ):
        written[job.split] += pairs
    shutil.rmtree(work)
    return written


def build_manifest(cfg, sources, rows_in, rows_out, drops, tok_fingerprint, started, seconds) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "stage": "prepare",
        "sources": [
            {"path": os.path.abspath(p), "rows": r, "sha256": cached_sha256(Path(p))} for p, _, r in sources
        ],
        "rows_in": rows_in,
        "rows_out": rows_out,
        "drops": drops,
        "config": asdict(cfg),
        "tokenizer_fingerprint": tok_fingerprint,
        "columns": {
            "reward": cfg.reward_output_key,
            "response": cfg.response_key,
            "raw_reward": raw_reward_column(cfg),
        },  # fmt: skip
        "seconds": round(time.time() - started, 3),
        "seconds_by_pass": {name: round(value, 3) for name, value in seconds.items()},
    }


def reusable(cfg: PrepareConfig, files: list[str], tok_fingerprint: str | None) -> dict | None:
    """The manifest of output_dir when it is a complete prepare output of these very files (path, size,
    sha256: cached per size and mtime) with the same output-deciding settings and tokenizer; else None."""
    path = Path(cfg.output_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("stage") != "prepare" or manifest.get("schema_version") != SCHEMA_VERSION:
        return None
    ours = {k: v for k, v in asdict(cfg).items() if k not in PrepareConfig.NOT_OUTPUT}
    theirs = {k: v for k, v in (manifest.get("config") or {}).items() if k not in PrepareConfig.NOT_OUTPUT}
    if ours != theirs or manifest.get("tokenizer_fingerprint") != tok_fingerprint:
        return None
    recorded = [(s.get("path"), s.get("sha256")) for s in manifest.get("sources") or []]
    if [path for path, _ in recorded] != [os.path.abspath(f) for f in files]:  # before hashing anything
        return None
    return manifest if [sha for _, sha in recorded] == [cached_sha256(Path(f)) for f in files] else None


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = parse_stage_args(CONFIG_CLASSES, argv, "prepare")
    started = time.time()
    views = check_config(cfg)
    out, files = Path(cfg.output_dir), resolve_files(cfg.data_path, "data_path")
    tok_fingerprint = tokenizer_fingerprint_of(cfg)
    if cfg.reuse and (manifest := reusable(cfg, files, tok_fingerprint)) is not None:
        logger.info("prepare: %s is complete, from the same files and settings: reused", out)
        print(json.dumps({"output_dir": str(out), "reused": True, "rows_in": manifest["rows_in"],
                          "rows_out": manifest["rows_out"], "drops": manifest["drops"]}))  # fmt: skip
        return manifest
    inputs = [*files, cfg.tokenizer_name_or_path]
    outputs.check_replaceable(out, "prepare", inputs)

    # pass 1: validate everything and decide each row's fate before writing anything
    sources = open_sources(files)
    for path, schema, _ in sources:
        check_schema(path, schema, cfg)
    rows_in = sum(rows for _, _, rows in sources)
    if rows_in == 0:
        raise PipelineError(f"{cfg.data_path}: no rows")
    # every pass runs in `num_proc` processes over disjoint rows
    units = work_units(sources)
    num_proc = cfg.num_proc or (min(2, os.cpu_count() or 1) if rows_in >= 200_000 else 1)
    num_proc = max(1, min(num_proc, len(units)))
    with worker_pool(num_proc) as pool:
        index = scan_rows(sources, units, cfg, pool, num_proc - 1)
        seconds = {"scan": time.time() - started}
        pa.default_memory_pool().release_unused()  # pass 1's batches are gone; give their memory back
        plan, drops = plan_rows(index, cfg)
        with outputs.replacing(out, "prepare", inputs) as tmp:
            rows_out, too_long, (good, bad), pairs_chosen = write_all_views(
                cfg, views, tmp, pool, num_proc, units, plan, rows_in
            )
            seconds["views"] = time.time() - started - sum(seconds.values())
            drops["too_long"] = len(too_long)
            plan.keep[too_long] = False
            if not plan.keep.any():
                raise PipelineError(f"{cfg.data_path}: zero rows left after filtering (drops: {drops})")
            if "pairs" in views:  # pass 3: the other pairs (all of them after a length filter)
                if good is None:
                    good, bad = choose_pairs(plan.prompt_keys, plan.rewards, plan.keep, cfg)
                    pairs_chosen = len(good)
                for split, pairs in write_late_pairs(cfg, tmp, pool, num_proc, plan, good, bad).items():
                    rows_out[f"pairs_{split}"] += pairs
                drops["identical_pairs"] = pairs_chosen - rows_out["pairs_train"] - rows_out["pairs_eval"]
                if drops["identical_pairs"]:
                    logger.info("prepare: %d pairs left out: chosen and rejected are the same text",
                                drops["identical_pairs"])  # fmt: skip
                seconds["pairs"] = time.time() - started - sum(seconds.values())
            if "rl" not in views:
                shutil.rmtree(tmp / "rl")
            rows_out = {k: v for k, v in rows_out.items() if k.split("_")[0] in views}
            manifest = build_manifest(
                cfg, sources, rows_in, rows_out, drops, tok_fingerprint, started, seconds
            )
            atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    logger.info("prepare: %d rows in, %s out, drops %s -> %s", rows_in, rows_out, drops, out)
    print(json.dumps({"output_dir": str(out), "rows_in": rows_in, "rows_out": rows_out, "drops": drops}))
    return manifest
