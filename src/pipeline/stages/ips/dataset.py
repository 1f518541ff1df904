"""IPS's training rows: the rl view joined with its stored reference logps, filtered, baselined,
tokenized by the logp stage's function; and the collator that batches them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from trl import ModelConfig

from pipeline.data import read_prepared_split
from pipeline.errors import PipelineError
from pipeline.logp_store import Expected, check_contract, read_logps, read_store_manifest, training_dtype
from pipeline.stages.ips.config import NO_SIGNAL, IPSConfig, no_signal_message, reward_options
from pipeline.training import dry_run_reference_logps


def stored_logps(args: IPSConfig, model_args: ModelConfig, tokenizer) -> tuple[dict | None, str, dict]:
    """(logps by uid, the response column, run.json's `logp_contract`) once the store is checked against
    this run (`pipeline.logp_store.check_contract`). A dry run scores its own reference with the tiny model."""
    from pipeline.tokenization import tokenizer_fingerprint

    logp_dir = Path(args.logp_dir or f"{args.data_path.rstrip('/')}_{args.ref_tag}_logp")
    manifest = read_store_manifest(logp_dir, "logp_dir")
    response_key = args.response_key or manifest.get("response_column", "unprocessed_response")
    if manifest.get("response_column") not in (None, response_key):
        raise PipelineError(f"response_key '{response_key}' differs from the column the logps scored "
                            f"('{manifest['response_column']}')")  # fmt: skip
    if args.dry_run:
        return (
            None,
            response_key,
            {"logp_dir": str(logp_dir), "dry_run": "reference scored by the tiny model"},
        )
    reference = args.ref_model_name_or_path or model_args.model_name_or_path
    expected = Expected(args.data_path, reference, tokenizer_fingerprint(tokenizer), args.max_length,
                        training_dtype(args, model_args))  # fmt: skip
    contract = check_contract(logp_dir, "logp_dir", manifest, expected, args.allow_logp_dtype_mismatch)
    contract["model_fingerprint"] = manifest.get("model_fingerprint")
    return read_logps(logp_dir), response_key, contract


def build_dataset(args: IPSConfig, split: str, tokenizer, logps: dict | None, response_key: str,
                  dry_run_model: str | None = None):  # fmt: skip
    """Rows of the rl view joined with their logps, filtered, baselined and tokenized.

    `logps` None (a dry run): the first rows only, with reference logps scored by `dry_run_model`."""
    from datasets import Dataset

    from pipeline.tokenization import parse_prompt, tokenize_prompt_response

    columns = ["uid", "prompt_pretokenized", response_key, args.reward_key, "prompt_id"]
    table = read_prepared_split(args.data_path, "rl", split, columns)
    if table is None:
        return None, {}
    if logps is None:
        table, logps = dry_run_reference_logps(dry_run_model, tokenizer, table, response_key, args.max_length)
    uids = table.column("uid").to_pylist()
    rewards = table.column(args.reward_key).to_numpy(zero_copy_only=False).astype(np.float64)
    counts = {"rows": len(uids)}
    has_logps = np.array([u in logps for u in uids])
    missing = int((~has_logps).sum())
    if missing and not args.skip_missing:
        first = uids[int(np.flatnonzero(~has_logps)[0])]
        raise PipelineError(f"{split}: {missing} of {len(uids)} rows have no stored logps (first uid {first!r}); "
                            "run `pipeline logp` on this data, or pass --skip_missing true")  # fmt: skip
    keep = has_logps.copy()
    counts["skipped_missing_logps"] = missing
    if args.datafilter == "posonly":
        keep &= rewards > args.pos_threshold
    elif args.datafilter == "negonly":
        keep &= rewards <= 0
    counts[f"dropped_{args.datafilter}"] = int(has_logps.sum() - keep.sum())
    if args.reward_baseline == "prompt_mean":
        groups = table.column("prompt_id").to_numpy()
        for key in np.unique(groups[keep]):
            members = keep & (groups == key)
            rewards[members] -= rewards[members].mean()
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        raise PipelineError(
            f"{split}: no rows left to train on after {reward_options(args)} (counts: {counts})"
        )
    if split == "train" and np.all(np.abs(rewards[rows]) <= NO_SIGNAL):
        raise PipelineError(no_signal_message(args, table, rows))
    prompts = [parse_prompt(p) for p in table.column("prompt_pretokenized").take(pa.array(rows)).to_pylist()]
    responses = table.column(response_key).take(pa.array(rows)).to_pylist()
    samples = tokenize_prompt_response(tokenizer, prompts, responses, args.max_length)
    ref = [np.asarray(logps[uids[i]], dtype=np.float32) for i in rows]
    for sample, values, i in zip(samples, ref, rows, strict=True):
        if sample.response_len != len(values):
            raise PipelineError(f"uid {uids[i]!r}: {sample.response_len} response tokens here but {len(values)} "
                                "stored logps; the logps were made with other tokenization settings")  # fmt: skip
    counts["used_rows"] = len(rows)
    dataset = Dataset.from_dict({
        "input_ids": [s.input_ids for s in samples],
        "prompt_len": [s.prompt_len for s in samples],
        "ref_logps": [v.tolist() for v in ref],
        "reward": rewards[rows].tolist(),
    })  # fmt: skip
    return dataset, counts


class IPSCollator:
    """Batches for the IPS loss; ref logps laid out as [batch, longest response] with a mask.

    Padded (default): one right-padded row per sample with an attention mask. Padding-free
    (`padding_free: true`): every sample of the batch end to end in a single row, position ids restarting
    at 0 per sample and no attention mask, so no compute is spent on padding. `row`/`start` say where each
    sample sits either way.
    """

    def __init__(self, pad_id: int, padding_free: bool = False):
        self.pad_id, self.padding_free = pad_id, padding_free

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
