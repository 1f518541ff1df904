"""IPS's training rows: the split's tokenized view (`pipeline.token_view`: tokenized by the logp stage's
function, joined with the stored reference logps, memory-mapped), filtered and baselined with numpy over
the split's reward and prompt-id columns; and the collator that batches them. No per-row Python object
is held for the split: a rank holds a few numpy columns, and the pages of the view its batches touch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from trl import ModelConfig

from pipeline.data import read_prepared_split
from pipeline.errors import PipelineError
from pipeline.logp_store import Expected, check_contract, read_store_manifest, training_dtype
from pipeline.sampling import nested_ids_order
from pipeline.stages.ips.config import NO_SIGNAL, IPSConfig, no_signal_message, reward_options
from pipeline.token_view import ViewRequest, token_view
from pipeline.training import dry_run_reference_logps


def stored_logps(args: IPSConfig, model_args: ModelConfig, tokenizer) -> tuple[str, str, dict]:
    """(the logp store's folder, the response column, run.json's `logp_contract`) once the store is checked
    against this run (`pipeline.logp_store.check_contract`). A dry run scores its own reference with the
    tiny model instead."""
    from pipeline.tokenization import tokenizer_fingerprint

    logp_dir = Path(args.logp_dir or f"{args.data_path.rstrip('/')}_{args.ref_tag}_logp")
    manifest = read_store_manifest(logp_dir, "logp_dir")
    response_key = args.response_key or manifest.get("response_column", "unprocessed_response")
    if manifest.get("response_column") not in (None, response_key):
        raise PipelineError(f"response_key '{response_key}' differs from the column the logps scored "
                            f"('{manifest['response_column']}')")  # fmt: skip
    if args.dry_run:
        return (
            str(logp_dir),
            response_key,
            {"logp_dir": str(logp_dir), "dry_run": "reference scored by the tiny model"},
        )
    reference = args.ref_model_name_or_path or model_args.model_name_or_path
    expected = Expected(args.data_path, reference, tokenizer_fingerprint(tokenizer), args.max_length,
                        training_dtype(args, model_args))  # fmt: skip
    contract = check_contract(logp_dir, "logp_dir", manifest, expected, args.allow_logp_dtype_mismatch)
    contract["model_fingerprint"] = manifest.get("model_fingerprint")
    return str(logp_dir), response_key, contract


def prompt_mean_baseline(rewards: np.ndarray, groups: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Each kept row's reward minus the mean over the kept rows of its prompt (a group-by, O(rows))."""
    out = rewards.copy()
    _, inverse = np.unique(groups[keep], return_inverse=True)
    means = np.bincount(inverse, weights=rewards[keep]) / np.bincount(inverse)
    out[keep] = rewards[keep] - means[inverse]
    return out


def _dry_run_view(args: IPSConfig, split: str, tokenizer, response_key: str, model: str):
    """A dry run's few rows, in memory, with reference logps scored by the tiny model (the stored ones
    belong to the real model's tokenizer)."""
    from datasets import Dataset

    from pipeline.tokenization import parse_prompt, tokenize_prompt_response

    table = read_prepared_split(args.data_path, "rl", split, ["uid", "prompt_pretokenized", response_key])
    if table is None:
        return None
    table, logps = dry_run_reference_logps(model, tokenizer, table, response_key, args.max_length)
    prompts = [parse_prompt(p) for p in table.column("prompt_pretokenized").to_pylist()]
    samples = tokenize_prompt_response(
        tokenizer, prompts, table.column(response_key).to_pylist(), args.max_length
    )
    uids = table.column("uid").to_pylist()
    return Dataset.from_dict({
        "row": list(range(len(uids))), "uid": uids, "input_ids": [s.input_ids for s in samples],
        "prompt_len": [s.prompt_len for s in samples], "ref_logps": [logps[u].tolist() for u in uids],
    })  # fmt: skip


def with_rewards(dataset, rewards: np.ndarray, behaviour=None):
    """`reward` (rewards[row]) and, given `behaviour` (flat log-probs, offsets), `behaviour_logps` added to
    each row as it is read, without copying the memory-mapped rows."""

    def add(batch: dict) -> dict:
        rows = np.asarray(batch["row"])
        out = {**batch, "reward": rewards[rows].tolist()}
        if behaviour is not None:
            flat, offsets = behaviour
            out["behaviour_logps"] = [flat[offsets[r] : offsets[r + 1]].tolist() for r in rows]
        return out

    return dataset.with_transform(add)


BEHAVIOUR_COLUMNS = ("behaviour_logps", "behaviour_token_ids")


def _spans(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices starts[i], ..., starts[i] + lengths[i] - 1 for every i, concatenated."""
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.repeat(starts.astype(np.int64) - before, lengths) + np.arange(
        int(lengths.sum()), dtype=np.int64
    )


def behaviour_logps(args: IPSConfig, split: str, view, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat log-probs, row offsets, usable) of the rows' sampled tokens, from the columns `pipeline collect`
    writes. A row is usable when the tokens it trains on (the response as `tokenize_prompt_response` makes
    it) are exactly the tokens sampled: not when the answer was cut at max_new_tokens (no EOS was sampled),
    cut at max_length, or re-tokenizes differently."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.data import prepared_shards

    first = prepared_shards(args.data_path, "rl", split)[0]
    names = pq.read_schema(first).names
    if any(c not in names for c in BEHAVIOUR_COLUMNS):
        raise PipelineError(f"importance_logps: behaviour needs the columns `pipeline collect` writes "
                            f"({', '.join(BEHAVIOUR_COLUMNS)}); {first} has none of them: use "
                            "importance_logps: reference for data sampled elsewhere")  # fmt: skip
    table = read_prepared_split(args.data_path, "rl", split, list(BEHAVIOUR_COLUMNS)).slice(0, n)
    sampled = table.column("behaviour_token_ids").combine_chunks()
    logps = table.column("behaviour_logps").combine_chunks()
    ids = view.data.column("input_ids").combine_chunks()
    prompt_len = view.data.column("prompt_len").to_numpy()
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False) - prompt_len
    sampled_len = pc.list_value_length(sampled).fill_null(-1).to_numpy(zero_copy_only=False)
    logp_len = pc.list_value_length(logps).fill_null(-2).to_numpy(zero_copy_only=False)
    usable = (lengths == sampled_len) & (logp_len == sampled_len) & (lengths > 0)
    # the response tokens of every usable row, side by side with the sampled ones
    rows = np.flatnonzero(usable)
    span = lengths[rows]
    trained = ids.values.to_numpy()[_spans(ids.offsets.to_numpy()[rows] + prompt_len[rows], span)]
    drawn = sampled.values.to_numpy()[_spans(sampled.offsets.to_numpy()[rows], span)]
    differs = (
        np.bincount(np.repeat(np.arange(len(rows)), span), weights=trained != drawn, minlength=len(rows)) > 0
    )
    usable[rows[differs]] = False
    flat = logps.values.to_numpy(zero_copy_only=False).astype(np.float32)
    return flat, logps.offsets.to_numpy(), usable


def build_dataset(args: IPSConfig, split: str, tokenizer, logp_dir: str, response_key: str,
                  dry_run_model: str | None = None, state=None):  # fmt: skip
    """(the split's training rows, counts): the tokenized view's rows with stored logps, filtered by
    `datafilter`, rewards baselined, `max_*_samples` applied; each row carries input_ids, prompt_len,
    ref_logps and its reward. (None, {}) for a split without rows."""
    if args.dry_run:
        view, reused, folder = _dry_run_view(args, split, tokenizer, response_key, dry_run_model), None, None
    else:
        request = ViewRequest(
            args.data_path, split, args.max_length, response_key, logp_dir, args.token_view_dir
        )
        found = token_view(request, tokenizer, state)
        view, reused, folder = (
            (found.dataset, found.reused, str(found.folder)) if found else (None, None, None)
        )
    if view is None:
        return None, {}
    # the view holds the split's first len(view) rows in order (all of them but in a dry run): row i is
    # position i, so the reward and prompt-id columns line up by position
    n = len(view)
    columns = read_prepared_split(args.data_path, "rl", split, [args.reward_key, "prompt_id"]).slice(0, n)
    raw_rewards = columns.column(args.reward_key).to_numpy().astype(np.float64)
    groups = columns.column("prompt_id").to_numpy()
    del columns
    counts: dict = {"rows": n}
    if folder is not None:
        counts.update(token_view=folder, token_view_reused=reused)
    has_logps = ~view.data.column("ref_logps").is_null().to_numpy()
    missing = int((~has_logps).sum())
    if missing and not args.skip_missing:
        first = view.data.column("uid")[int(np.flatnonzero(~has_logps)[0])].as_py()
        raise PipelineError(f"{split}: {missing} of {n} rows have no stored logps (first uid {first!r}); "
                            "run `pipeline logp` on this data, or pass --skip_missing true")  # fmt: skip
    keep = has_logps.copy()
    counts["skipped_missing_logps"] = missing
    rewards = raw_rewards
    if args.datafilter == "posonly":
        keep &= rewards > args.pos_threshold
    elif args.datafilter == "negonly":
        keep &= rewards <= 0
    counts[f"dropped_{args.datafilter}"] = int(has_logps.sum() - keep.sum())
    behaviour = None
    if args.importance_logps == "behaviour":
        flat, offsets, usable = behaviour_logps(args, split, view, n)
        counts["dropped_behaviour_mismatch"] = int((keep & ~usable).sum())
        keep &= usable
        behaviour = (flat, offsets)
    if args.reward_baseline == "prompt_mean":
        rewards = prompt_mean_baseline(rewards, groups, keep)
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        raise PipelineError(
            f"{split}: no rows left to train on after {reward_options(args)} (counts: {counts})"
        )
    if split == "train" and np.all(np.abs(rewards[rows]) <= NO_SIGNAL):
        raise PipelineError(no_signal_message(args, raw_rewards[rows], len(rows)))
    limit = args.max_train_samples if split == "train" else args.max_eval_samples
    if limit and limit < len(rows):  # nested and prompt by prompt, the same rows for every run seed
        rows = rows[nested_ids_order(groups[rows], rows)[:limit]]
        counts[f"limited_to_max_{split}_samples"] = int(limit)
    counts["used_rows"] = len(rows)
    dataset = view.select(rows, keep_in_memory=True).select_columns(
        ["row", "input_ids", "prompt_len", "ref_logps"]
    )
    return with_rewards(dataset, rewards, behaviour), counts


class IPSCollator:
    """Batches for the IPS loss; ref logps laid out as [batch, longest response] with a mask.

    Padded (default): one right-padded row per sample with an attention mask. Padding-free
    (`padding_free: true`): every sample of the batch end to end in a single row, position ids restarting
    at 0 per sample and no attention mask, so no compute is spent on padding. `row`/`start` say where each
    sample sits either way.
    """

    def __init__(self, pad_id: int, padding_free: bool = False):
        self.pad_id, self.padding_free = pad_id, padding_free

    @staticmethod
    def behaviour(rows: list[dict], longest: int) -> dict[str, torch.Tensor]:
        if "behaviour_logps" not in rows[0]:
            return {}
        mu = torch.zeros((len(rows), longest), dtype=torch.float32)
        for i, r in enumerate(rows):
            mu[i, : len(r["behaviour_logps"])] = torch.tensor(r["behaviour_logps"])
        return {"behaviour_logps": mu}

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(r["input_ids"]) for r in rows]
        longest = max(max(len(r["ref_logps"]) for r in rows), 1)
        ref = torch.zeros((len(rows), longest), dtype=torch.float32)
        mask = torch.zeros((len(rows), longest), dtype=torch.bool)
        for i, r in enumerate(rows):
            ref[i, : len(r["ref_logps"])] = torch.tensor(r["ref_logps"])
            mask[i, : len(r["ref_logps"])] = True
        batch = {
            "prompt_len": torch.tensor([r["prompt_len"] for r in rows]),
            "ref_logps": ref,
            **self.behaviour(rows, longest),
            "response_mask": mask,
            "reward": torch.tensor([r["reward"] for r in rows], dtype=torch.float32),
        }
        if self.padding_free:
            batch["input_ids"] = torch.tensor([[t for r in rows for t in r["input_ids"]]])
            batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None]
            batch["row"] = torch.zeros(len(rows), dtype=torch.long)
            batch["start"] = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        else:
            ids = torch.full((len(rows), max(lengths)), self.pad_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, : lengths[i]] = torch.tensor(r["input_ids"])
                attention[i, : lengths[i]] = 1
            batch.update(input_ids=ids, attention_mask=attention, row=torch.arange(len(rows)),
                         start=torch.zeros(len(rows), dtype=torch.long))  # fmt: skip
        return batch
