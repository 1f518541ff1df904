"""IPS stage: offline importance-sampling training from reward-keyed responses and stored reference logps.

    pipeline ips --config recipes/demo/ips.yaml [--loss_type topr --kl_coef 0.1 ...]
    scripts/train.sh DATAPATH MODELPATH TAG REWARDKEY RSPKEY DATAFILTER      # accelerate + DeepSpeed

Inputs: a `pipeline prepare` output (`data_path`, its `rl/` view) and the `pipeline logp` output for it
(`logp_dir`, default `{data_path}_{ref_tag}_logp`). Before any step the logp manifest must agree with this
run: same tokenizer, same `max_length`, same reference model (`ref_model_name_or_path`, default the model
being trained) and the same response column — else a one-line error. Rows without logps are an error that
says how many (or are skipped with `skip_missing: true`, counted and logged). No silent row limits.

Each row is tokenized by `tokenize_prompt_response`, the function the logp stage used, and its response
token count is checked against the stored logps. The loss (`pipeline.losses`, formula in its docstring and
the README) is computed on the policy's log-probs of response tokens (hidden states → lm_head in
checkpointed chunks, so no `[batch, seq, vocab]` tensor is kept for backward).

Fields: every `SFTConfig` field (optimizer, schedule, DeepSpeed, LoRA via `use_peft`...), `ModelConfig`, and
the IPS fields below. Metrics: policy loss split by reward sign, KL, ρ mean/max, clipped fraction, reward
mean, response tokens/s.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from trl import ModelConfig, SFTConfig, SFTTrainer

from pipeline.configs import StageOptions, parse_stage_args
from pipeline.data import prepared_shards
from pipeline.errors import PipelineError
from pipeline.losses import IPSLossConfig, ips_loss
from pipeline.resilience import dry_run_reference_logps
from pipeline.runinfo import RunInfo, metrics_logging_callback, setup_logging, setup_tracking
from pipeline.scoring import chunked_token_logps
from pipeline.training import check_model_dir, keep_bnb_4bit_trainable_on_cpu, train_evaluate_save

logger = logging.getLogger("pipeline.ips")


@dataclass
class IPSConfig(SFTConfig, StageOptions):
    """`SFTConfig` plus what IPS needs. Everything else (optimizer, DeepSpeed, logging) is TRL's."""

    data_path: str | None = field(default=None, metadata={"help": "A `pipeline prepare` output folder."})
    logp_dir: str | None = field(default=None, metadata={"help": "Default: {data_path}_{ref_tag}_logp."})
    ref_tag: str = field(
        default="ref", metadata={"help": "Tag of the logp run (names the default logp_dir)."}
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model the logps came from. Default: model_name_or_path."}
    )
    reward_key: str = field(default="reward", metadata={"help": "Reward column of the rl view to train on."})
    response_key: str | None = field(default=None, metadata={"help": "Default: the column the logps scored."})
    datafilter: Literal["none", "posonly", "negonly"] = field(
        default="none", metadata={"help": "none; posonly: reward > pos_threshold; negonly: reward <= 0."}
    )
    pos_threshold: float = field(default=0.75, metadata={"help": "posonly keeps reward > this."})
    reward_baseline: Literal["none", "prompt_mean"] = field(
        default="none", metadata={"help": "prompt_mean: subtract the mean reward of the prompt's responses."}
    )
    loss_type: Literal["ips", "topr", "rwr"] = field(default="ips", metadata={"help": "See pipeline.losses."})
    is_clip_min: float | None = field(default=None, metadata={"help": "Lower clip of ρ (ips). Default none."})
    is_clip_max: float | None = field(default=1.2, metadata={"help": "Upper clip of ρ (ips)."})
    kl_coef: float = field(default=0.5, metadata={"help": "Weight of the KL term."})
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata={"help": "Per-token KL estimate."})
    kl_neg_discount: float = field(default=0.5, metadata={"help": "KL weight factor for negative rewards."})
    skip_missing: bool = field(default=False, metadata={"help": "Skip rows without stored logps (counted)."})
    lm_head_chunk: int = field(default=1024, metadata={"help": "Response tokens per lm_head chunk."})

    def __post_init__(self):
        super().__post_init__()
        self.remove_unused_columns = (
            False  # our collator needs ref_logps/reward, which the model does not take
        )
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}


# ------------------------------------------------------------------------------------------ data


def read_rl_split(data_path: str, split: str, columns: list[str]) -> pa.Table | None:
    files = prepared_shards(data_path, "rl", split)
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files]) if files else None


def read_logps(logp_dir: Path) -> dict[str, np.ndarray]:
    parts = sorted(logp_dir.glob("*-part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p, columns=["uid", "logps"]) for p in parts])
    return dict(
        zip(
            table.column("uid").to_pylist(), table.column("logps").to_numpy(zero_copy_only=False), strict=True
        )
    )


def check_logp_manifest(manifest: dict, logp_dir: Path, args: IPSConfig, model_args: ModelConfig, tokenizer):
    """Refuse logps that would misalign with this run's tokens or come from another reference model."""
    from pipeline.stages.logp import model_fingerprint
    from pipeline.tokenization import tokenizer_fingerprint

    problems = []
    if manifest.get("tokenizer_fingerprint") is None:
        logger.warning(
            "ips: %s was imported without a tokenizer record; token alignment is checked per row", logp_dir
        )
    elif manifest["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        problems.append("tokenizer")
    if manifest.get("max_length") not in (None, args.max_length):
        problems.append(f"max_length ({manifest['max_length']} there, {args.max_length} here)")
    ref = args.ref_model_name_or_path or model_args.model_name_or_path
    if manifest.get("model_fingerprint") not in (None, model_fingerprint(ref)):
        problems.append(f"reference model (not {ref})")
    if problems:
        raise PipelineError(f"{logp_dir}: logps were computed with another {', '.join(problems)}; "
                            "recompute them with `pipeline logp` for this setting")  # fmt: skip


def build_dataset(args: IPSConfig, split: str, tokenizer, logps: dict | None, response_key: str,
                  dry_run_model: str | None = None):  # fmt: skip
    """Rows of the rl view joined with their logps, filtered, baselined and tokenized.

    `logps` None (a dry run): the first rows only, with reference logps scored by `dry_run_model`."""
    from datasets import Dataset

    from pipeline.tokenization import parse_prompt, tokenize_prompt_response

    table = read_rl_split(args.data_path, split, ["uid", "prompt_pretokenized", response_key, args.reward_key,
                                                   "prompt_id"])  # fmt: skip
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
        raise PipelineError(f"{split}: no rows left to train on (counts: {counts})")
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


# ------------------------------------------------------------------------------------------ trainer


class IPSTrainer(SFTTrainer):
    """TRL's SFTTrainer (model loading, PEFT, DeepSpeed, logging) with the IPS loss."""

    def __init__(self, *args, loss_config: IPSLossConfig, lm_head_chunk: int, **kwargs):
        # Two SFTConfig fields mean something else here and SFTTrainer validates them at init: `loss_type`
        # (TRL knows nll/dft; ours is in `loss_config`) and `padding_free` (TRL refuses a custom collator
        # with it; our collator implements it). Show SFTTrainer values it accepts, then put ours back.
        config = kwargs["args"]
        ours = {"loss_type": config.loss_type, "padding_free": config.padding_free}
        config.loss_type, config.padding_free = "nll", False
        try:
            super().__init__(*args, **kwargs)
        finally:
            for key, value in ours.items():
                setattr(config, key, value)
        self.loss_config, self.lm_head_chunk = loss_config, lm_head_chunk
        self._tokens, self._clock = 0, time.time()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        forward = {k: inputs[k] for k in ("attention_mask", "position_ids") if k in inputs}
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1, **forward)
        hidden = out.hidden_states[-1]
        mask = inputs["response_mask"]
        samples, cols = torch.nonzero(mask, as_tuple=True)  # response token j of sample b ...
        rows = inputs["row"][samples]  # ... sits in row `row[b]` at start[b] + prompt_len[b] + j
        positions = inputs["start"][samples] + inputs["prompt_len"][samples] + cols
        lm_head = self.accelerator.unwrap_model(model).get_output_embeddings()
        flat = chunked_token_logps(
            lm_head, hidden[rows, positions - 1], ids[rows, positions], self.lm_head_chunk
        )
        policy = torch.zeros(mask.shape, dtype=torch.float32, device=flat.device).index_put(
            (samples, cols), flat
        )
        loss, stats = ips_loss(policy, inputs["ref_logps"], mask, inputs["reward"], self.loss_config)
        mode = "train" if model.training else "eval"
        for key, value in stats.items():
            if torch.isfinite(value):
                self._metrics[mode][f"ips/{key}"].append(value.item())
        if mode == "train":
            self._tokens += int(mask.sum())
            elapsed = time.time() - self._clock
            self._metrics[mode]["ips/response_tokens_per_s"].append(self._tokens / max(elapsed, 1e-9))
        return (loss, out) if return_outputs else loss


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    args, model_args = parse_stage_args((IPSConfig, ModelConfig), argv, "ips")
    from transformers import AutoTokenizer, set_seed
    from trl import get_peft_config, get_quantization_config

    if not args.data_path:
        raise PipelineError("data_path is required (a `pipeline prepare` output)")
    check_model_dir(model_args.model_name_or_path)
    if args.ref_model_name_or_path:
        check_model_dir(args.ref_model_name_or_path, "ref_model_name_or_path")
    if args.max_length is None:
        raise PipelineError("max_length is required (it must equal the logp run's)")
    if args.packing:
        raise PipelineError(
            "packing is not available for ips; use padding_free: true (no compute on padding)"
        )
    logp_dir = Path(args.logp_dir or f"{args.data_path.rstrip('/')}_{args.ref_tag}_logp")
    if not (logp_dir / "manifest.json").is_file():
        raise PipelineError(
            f"{logp_dir}: no finished logp run (manifest.json missing); run `pipeline logp` first"
        )
    manifest = json.loads((logp_dir / "manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    if not args.dry_run:  # a dry run's tiny model scores its own reference logps (build_dataset)
        check_logp_manifest(manifest, logp_dir, args, model_args, tokenizer)
    response_key = args.response_key or manifest.get("response_column", "unprocessed_response")
    if manifest.get("response_column") not in (None, response_key):
        raise PipelineError(f"response_key '{response_key}' differs from the column the logps scored "
                            f"('{manifest['response_column']}')")  # fmt: skip

    logps = None if args.dry_run else read_logps(logp_dir)
    reference = args.ref_model_name_or_path or model_args.model_name_or_path
    train_dataset, counts = build_dataset(args, "train", tokenizer, logps, response_key, reference)
    if train_dataset is None:
        raise PipelineError(f"{args.data_path}: no rl/train-*.parquet rows")
    eval_dataset, eval_counts = build_dataset(args, "eval", tokenizer, logps, response_key, reference)
    counts.update({f"eval_{k}": v for k, v in eval_counts.items()})
    if eval_dataset is None and args.eval_strategy != "no":
        args.eval_strategy = "no"

    # every check passed: only now is anything written
    os.makedirs(args.output_dir, exist_ok=True)
    setup_logging(args.output_dir)
    setup_tracking(args.report_to, args.output_dir)
    logger.info("ips: data %s", counts)
    set_seed(args.seed)
    run = RunInfo(args.output_dir, "ips", (args, model_args), args.seed)

    quantization_config = get_quantization_config(model_args)
    args.model_init_kwargs = {"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation,
                              **(args.model_init_kwargs or {})}  # fmt: skip
    trainer = IPSTrainer(
        model=model_args.model_name_or_path,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=IPSCollator(tokenizer.pad_token_id, padding_free=args.padding_free),
        peft_config=get_peft_config(model_args),
        quantization_config=quantization_config,
        callbacks=[metrics_logging_callback(logging.getLogger("pipeline.ips.metrics"))],
        loss_config=IPSLossConfig(
            args.loss_type,
            args.is_clip_min,
            args.is_clip_max,
            args.kl_coef,
            args.kl_estimator,
            args.kl_neg_discount,
        ),  # fmt: skip
        lm_head_chunk=args.lm_head_chunk,
    )
    if quantization_config is not None:
        keep_bnb_4bit_trainable_on_cpu(trainer.model)
    metrics: dict = {f"train_{k}" if not k.startswith("eval_") else k: v for k, v in counts.items()}
    return train_evaluate_save(trainer, run, metrics, args.output_dir, args.resume_from_checkpoint,
                               merge_lora=args.merge_lora)  # fmt: skip
