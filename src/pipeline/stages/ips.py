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

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from trl import ModelConfig, SFTConfig, SFTTrainer

from pipeline import outputs
from pipeline.configs import StageOptions, parse_stage_args
from pipeline.data import read_prepared_split
from pipeline.errors import PipelineError
from pipeline.logp_store import (
    Expected,
    check_contract,
    model_fingerprint,
    read_logps,
    read_store_manifest,
    training_dtype,
)
from pipeline.losses import IPSLossConfig, ips_loss
from pipeline.models import check_model_dir
from pipeline.runinfo import RunInfo, metrics_logging_callback, setup_logging, setup_tracking
from pipeline.scoring import chunked_token_logps
from pipeline.training import (
    dry_run_reference_logps,
    keep_bnb_4bit_trainable_on_cpu,
    refuse_resuming_another_run,
    train_evaluate_save,
)

logger = logging.getLogger("pipeline.ips")
NO_SIGNAL = 1e-8  # rewards this close to 0 train nothing
# the first batch's mean |log πθ − log π_ref| per token above which a run that starts from its reference stops;
# measured on CPU (README, "logp contract"): 0 with fp32 logps, 0.0007-0.002 with bf16 ones, 0.5 with stale ones
LOGP_MISMATCH_THRESHOLD = 0.05


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
    loss_type: Literal["ips", "topr", "topr_token", "rwr"] = field(
        default="ips",
        metadata={"help": "ips: clipped per-token ratio; topr: sequence ratio truncated at 1 on negative rewards "
                  "(arXiv 2503.14286); topr_token: the per-token variant; rwr: no ratio. See pipeline.losses."},
    )  # fmt: skip
    is_clip_min: float | None = field(default=None, metadata={"help": "Lower clip of ρ (ips). Default none."})
    is_clip_max: float | None = field(default=1.2, metadata={"help": "Upper clip of ρ (ips)."})
    kl_coef: float = field(default=0.5, metadata={"help": "Weight of the KL term."})
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata={"help": "Per-token KL estimate."})
    kl_neg_discount: float = field(default=0.5, metadata={"help": "KL weight factor for negative rewards."})
    skip_missing: bool = field(default=False, metadata={"help": "Skip rows without stored logps (counted)."})
    allow_logp_dtype_mismatch: bool = field(
        default=False,
        metadata={"help": "Train on stored logps computed in another dtype than this run's (e.g. bf16 logps, fp32 "
                  "training): ρ is then off by the rounding of the other dtype. Recorded in run.json."},
    )  # fmt: skip
    logp_mismatch_threshold: float | None = field(
        default=LOGP_MISMATCH_THRESHOLD,
        metadata={"help": "Before the first update, the first batch's mean |log πθ − log π_ref| per response "
                  "token is measured (run.json: logp_mismatch). When the policy starts from the reference it "
                  "should be ~0; above this value the run stops. none: record only."},
    )  # fmt: skip
    lm_head_chunk: int = field(default=1024, metadata={"help": "Response tokens per lm_head chunk."})

    def __post_init__(self):
        super().__post_init__()
        self.remove_unused_columns = (
            False  # our collator needs ref_logps/reward, which the model does not take
        )
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}


# ------------------------------------------------------------------------------------------ data


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


def reward_options(args: IPSConfig) -> str:
    """The options that decide which rows and rewards are trained on, as the user set them."""
    said = [f"reward_key={args.reward_key}"]
    if args.datafilter != "none":
        said.append(f"datafilter={args.datafilter}"
                    + (f" (reward > {args.pos_threshold})" if args.datafilter == "posonly" else " (reward <= 0)"))  # fmt: skip
    if args.reward_baseline != "none":
        said.append(f"reward_baseline={args.reward_baseline}")
    return ", ".join(said)


def no_signal_message(args: IPSConfig, table: pa.Table, rows: np.ndarray) -> str:
    """Every reward left is 0: say which options did it and how to get a signal back."""
    raw = table.column(args.reward_key).take(pa.array(rows)).to_numpy(zero_copy_only=False).astype(np.float64)
    if args.reward_baseline == "prompt_mean" and np.any(np.abs(raw) > NO_SIGNAL):
        why = ("reward_baseline=prompt_mean subtracted each prompt's mean from rewards that are equal within every "
               "prompt" + (f" once datafilter={args.datafilter} kept only rows with " + (
                   f"reward > {args.pos_threshold}" if args.datafilter == "posonly" else "reward <= 0")
                   if args.datafilter != "none" else ""))  # fmt: skip
        fix = "drop reward_baseline" + (" or datafilter" if args.datafilter != "none" else "")
    else:
        why, fix = (
            f"the column '{args.reward_key}' is 0 on every row kept",
            "use another reward_key or datafilter",
        )
    return (
        f"train: all {len(rows)} rewards left are 0 (within {NO_SIGNAL:g}) after {reward_options(args)}: {why}; "
        f"the loss would learn nothing. {fix[0].upper()}{fix[1:]}"
    )


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

    def __init__(self, *args, loss_config: IPSLossConfig, lm_head_chunk: int, mismatch: MismatchCheck,
                 **kwargs):  # fmt: skip
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
        self.loss_config, self.lm_head_chunk, self.mismatch = loss_config, lm_head_chunk, mismatch
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
        mode = "train" if model.training else "eval"
        if mode == "train" and not self.mismatch.done:
            self.check_start_mismatch(policy.detach(), inputs["ref_logps"], mask)
        loss, stats = ips_loss(policy, inputs["ref_logps"], mask, inputs["reward"], self.loss_config)
        for key, value in stats.items():
            if torch.isfinite(value):
                self._metrics[mode][f"ips/{key}"].append(value.item())
        if mode == "train":
            self._tokens += int(mask.sum())
            elapsed = time.time() - self._clock
            self._metrics[mode]["ips/response_tokens_per_s"].append(self._tokens / max(elapsed, 1e-9))
        return (loss, out) if return_outputs else loss

    def check_start_mismatch(self, policy: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> None:
        """Before the first update: how far the policy's log-probs of its first batch (all ranks) are from the
        stored ones. Recorded in run.json and the tracker; when the policy starts from the reference, where
        ρ = 1 on every token, a mean |log ρ| above the threshold stops the run."""
        check = self.mismatch
        check.done = True
        if self.state.global_step > 0:
            check.record.update(
                skipped=f"resumed at step {self.state.global_step}: the policy is not the reference"
            )
            return
        log_ratio = (policy - ref)[mask]
        local = torch.stack([log_ratio.abs().sum(), (torch.exp(log_ratio) - 1 - log_ratio).sum(),
                             log_ratio.new_tensor(float(log_ratio.numel())),
                             log_ratio.abs().max() if log_ratio.numel() else log_ratio.new_zeros(())]).double()  # fmt: skip
        every = self.accelerator.gather(local[None]).reshape(-1, 4)
        tokens = max(float(every[:, 2].sum()), 1.0)
        stats = {"mean_abs_log_ratio": float(every[:, 0].sum()) / tokens, "max_abs_log_ratio": float(every[:, 3].max()),
                 "k3_kl": float(every[:, 1].sum()) / tokens, "tokens": int(tokens)}  # fmt: skip
        check.record.update(stats)
        for key in ("mean_abs_log_ratio", "max_abs_log_ratio", "k3_kl"):
            self._metrics["train"][f"logp_mismatch/{key}"].append(stats[key])
        logger.info("ips: step-0 logp mismatch over %d tokens: mean |log ρ| %.3g, max %.3g, k3 KL %.3g",
                    stats["tokens"], stats["mean_abs_log_ratio"], stats["max_abs_log_ratio"], stats["k3_kl"])  # fmt: skip
        threshold = check.record.get("threshold")
        if check.starts_from_reference and threshold is not None and stats["mean_abs_log_ratio"] > threshold:
            raise PipelineError(
                f"step 0: the policy starts from the reference, yet its log-probs of the first batch differ from "
                f"the stored ones by {stats['mean_abs_log_ratio']:.3g} per token on average (max "
                f"{stats['max_abs_log_ratio']:.3g}; logp_mismatch_threshold {threshold:g}), where they should agree; "
                "the stored logps do not belong to this model, data or precision: recompute them with `pipeline "
                "logp`, or raise logp_mismatch_threshold (none: record only)"
            )


@dataclass
class MismatchCheck:
    """The step-0 check's setting and outcome (`record` is run.json's `logp_mismatch`)."""

    starts_from_reference: bool
    record: dict
    done: bool = False


def starts_from_reference(model_dir: str, reference: str, reference_fingerprint: str | None) -> bool:
    """Whether the policy's starting weights are the reference's (the same folder or the same files)."""
    if os.path.realpath(model_dir) == os.path.realpath(reference):
        return True
    try:
        return reference_fingerprint is not None and model_fingerprint(model_dir) == reference_fingerprint
    except PipelineError:  # an adapter folder: not the reference's files
        return False


# ------------------------------------------------------------------------------------------ main


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


# the dataclasses a recipe of this stage fills (tests/test_configs.py parses every shipped recipe with them)
CONFIG_CLASSES = (IPSConfig, ModelConfig)


def main(argv: list[str] | None = None) -> dict:
    args, model_args = parse_stage_args(CONFIG_CLASSES, argv, "ips")
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
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    logps, response_key, contract = stored_logps(args, model_args, tokenizer)
    reference = args.ref_model_name_or_path or model_args.model_name_or_path
    train_dataset, counts = build_dataset(args, "train", tokenizer, logps, response_key, reference)
    if train_dataset is None:
        raise PipelineError(f"{args.data_path}: no rl/train-*.parquet rows")
    eval_dataset, eval_counts = build_dataset(args, "eval", tokenizer, logps, response_key, reference)
    counts.update({f"eval_{k}": v for k, v in eval_counts.items()})
    if eval_dataset is None and args.eval_strategy != "no":
        args.eval_strategy = "no"
    mismatch = MismatchCheck(
        starts_from_reference(model_args.model_name_or_path, reference, contract.get("model_fingerprint")),
        {"threshold": args.logp_mismatch_threshold},
    )
    mismatch.record["starts_from_reference"] = mismatch.starts_from_reference

    # every check passed: only now is anything written
    outputs.claim(args.output_dir, "ips")
    refuse_resuming_another_run(args.output_dir, "ips", (args, model_args), args.resume_from_checkpoint)
    setup_logging(args.output_dir)
    setup_tracking(args.report_to, args.output_dir)
    logger.info("ips: data %s", counts)
    set_seed(args.seed)
    run = RunInfo(args.output_dir, "ips", (args, model_args), args.seed)

    quantization_config = get_quantization_config(model_args)
    args.model_init_kwargs = {"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation,
                              **(args.model_init_kwargs or {})}  # fmt: skip
    loss_config = IPSLossConfig(args.loss_type, args.is_clip_min, args.is_clip_max, args.kl_coef,
                                args.kl_estimator, args.kl_neg_discount)  # fmt: skip
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
        loss_config=loss_config,
        lm_head_chunk=args.lm_head_chunk,
        mismatch=mismatch,
    )
    if quantization_config is not None:
        keep_bnb_4bit_trainable_on_cpu(trainer.model)
    metrics: dict = {f"train_{k}" if not k.startswith("eval_") else k: v for k, v in counts.items()}
    metrics.update(logp_contract=contract, logp_mismatch=mismatch.record)
    return train_evaluate_save(trainer, run, metrics, args.output_dir, args.resume_from_checkpoint,
                               merge_lora=args.merge_lora)  # fmt: skip
