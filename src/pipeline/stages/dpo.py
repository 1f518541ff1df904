"""DPO stage: a thin wrapper around TRL's `DPOTrainer`, with the reference taken from our logp stage if asked.

    pipeline dpo --config recipes/demo/dpo.yaml [--loss_type sigmoid sft --loss_weights 1.0 1.0 --beta 0.1 ...]
    pipeline dpo --config recipes/demo/dpo.yaml --data_path runs/demo/prepare --ref_logps_dir runs/demo/logp
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml -m pipeline.cli dpo --config ...

Data: `train_data`/`eval_data` preference files (`prompt`/`chosen`/`rejected`, chat lists or text; TRL
tokenizes them), or `data_path`, a `pipeline prepare` output: its `pairs/` view is trained on, and every
chosen/rejected response is tokenized from its `rl/` row by `tokenize_prompt_response` — the function the
logp and IPS stages use — so stored reference log-probs line up token for token.

The reference, one of:
- default: a frozen copy of the starting model (with LoRA, `use_peft: true`, the base model with the adapter
  switched off — no copy is loaded);
- `ref_model_name_or_path`: another model folder;
- `precompute_ref_log_probs: true`: TRL scores the data once with the reference before training;
- `ref_logps_dir`: the output of `pipeline logp` on `data_path` — no reference forward at all, and the
  same stored logps serve IPS. The logp manifest must match this run's tokenizer, `max_length` and
  reference model, and each response's token count must equal its stored logps' (else a one-line error).

Every TRL loss is available by name (`loss_type`, a list with `loss_weights` for mixtures). TRL logs
rewards/chosen, rewards/rejected, rewards/margins and rewards/accuracies; run.json holds eval loss, margin
and accuracy before and after training.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from trl import DPOConfig, DPOTrainer, ModelConfig

from pipeline.configs import DataArguments, parse_stage_args
from pipeline.data import load_train_eval, prepared_shards
from pipeline.errors import PipelineError
from pipeline.resilience import limit_rows
from pipeline.runinfo import RunInfo, metrics_logging_callback, setup_logging, setup_tracking
from pipeline.training import (
    check_model_dir,
    keep_bnb_4bit_trainable_on_cpu,
    model_init_kwargs,
    train_evaluate_save,
)

logger = logging.getLogger("pipeline.dpo")
EVAL_KEYS = ("rewards/margins", "rewards/accuracies")


@dataclass
class DPOStageConfig(DPOConfig):
    """`DPOConfig` plus where the data and the reference log-probs come from."""

    data_path: str | None = field(
        default=None, metadata={"help": "A `pipeline prepare` output: train on its pairs/ view (instead of train_data)."}
    )  # fmt: skip
    ref_logps_dir: str | None = field(
        default=None, metadata={"help": "A `pipeline logp` output for data_path: reference log-probs read, not computed."}
    )  # fmt: skip
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reference model folder. Default: the starting model (or LoRA's base)."},
    )


class PipelineDPOTrainer(DPOTrainer):
    """TRL's trainer, except that datasets we tokenized ourselves, or that carry stored reference logps, are
    used as they are."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "chosen_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if "ref_chosen_logps" in dataset.column_names:
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)


def prepared_pairs(args: DPOStageConfig, split: str, tokenizer, logps: dict | None):
    """The pairs of a prepare output's split, tokenized from their rl rows (plus summed stored ref logps)."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    from pipeline.stages.ips import read_rl_split
    from pipeline.tokenization import parse_prompt, tokenize_prompt_response

    files = prepared_shards(args.data_path, "pairs", split)
    if not files:
        return None
    pairs = pa.concat_tables([pq.read_table(f, columns=["chosen_uid", "rejected_uid"]) for f in files])
    response_key = json.loads((Path(args.data_path) / "manifest.json").read_text())["columns"]["response"]
    rl = read_rl_split(args.data_path, split, ["uid", "prompt_pretokenized", response_key])
    row_of = {uid: i for i, uid in enumerate(rl.column("uid").to_pylist())}
    prompts, responses = rl.column("prompt_pretokenized").to_pylist(), rl.column(response_key).to_pylist()
    columns: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    if logps is not None:
        columns.update(ref_chosen_logps=[], ref_rejected_logps=[])
    for chosen_uid, rejected_uid in zip(pairs.column("chosen_uid").to_pylist(),
                                        pairs.column("rejected_uid").to_pylist(), strict=True):  # fmt: skip
        missing = [uid for uid in (chosen_uid, rejected_uid) if uid not in row_of]
        if missing:
            raise PipelineError(f"{args.data_path}: pairs/{split} names uid {missing[0]!r}, which its rl/{split} "
                                "view lacks; re-run `pipeline prepare` into a fresh output_dir")  # fmt: skip
        rows = [row_of[chosen_uid], row_of[rejected_uid]]
        prompt = parse_prompt(prompts[rows[0]])
        chosen, rejected = tokenize_prompt_response(
            tokenizer, [prompt, prompt], [responses[r] for r in rows], args.max_length
        )
        columns["prompt_ids"].append(chosen.input_ids[: chosen.prompt_len])
        columns["chosen_ids"].append(chosen.input_ids[chosen.prompt_len :])
        columns["rejected_ids"].append(rejected.input_ids[rejected.prompt_len :])
        if logps is None:
            continue
        for uid, sample, key in (
            (chosen_uid, chosen, "ref_chosen_logps"),
            (rejected_uid, rejected, "ref_rejected_logps"),
        ):
            if uid not in logps:
                raise PipelineError(f"{args.ref_logps_dir}: no stored logps for uid {uid!r} ({split} pairs); "
                                    "run `pipeline logp` on this prepare output")  # fmt: skip
            if len(logps[uid]) != sample.response_len:
                raise PipelineError(f"uid {uid!r}: {sample.response_len} response tokens here but {len(logps[uid])} "
                                    "stored logps; the logps were made with other tokenization settings")  # fmt: skip
            columns[key].append(float(np.sum(logps[uid], dtype=np.float64)))
    return Dataset.from_dict(columns)


def main(argv: list[str] | None = None) -> dict:
    data_args, training_args, model_args = parse_stage_args(
        (DataArguments, DPOStageConfig, ModelConfig), argv, "dpo"
    )

    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import get_peft_config, get_quantization_config

    check_model_dir(model_args.model_name_or_path)
    if training_args.data_path and (data_args.train_data or data_args.eval_data):
        raise PipelineError(
            "data_path and train_data/eval_data are both set, and data_path (a prepare output) would be trained "
            "on; keep one (`--data_path ''` drops a recipe's data_path)"
        )
    if training_args.ref_logps_dir and not training_args.data_path:
        raise PipelineError("ref_logps_dir needs data_path (the prepare output the logps were computed on)")
    if training_args.ref_logps_dir and training_args.ref_model_name_or_path is None and model_args.use_peft:
        logger.info("dpo: stored logps stand for the reference; the LoRA base is not used as one")
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    logps = None
    if training_args.ref_logps_dir:
        from pipeline.stages.ips import check_logp_manifest, read_logps

        logp_dir = Path(training_args.ref_logps_dir)
        if not (logp_dir / "manifest.json").is_file():
            raise PipelineError(
                f"ref_logps_dir '{logp_dir}': no manifest.json (not a finished `pipeline logp` output)"
            )
        check_logp_manifest(json.loads((logp_dir / "manifest.json").read_text()), logp_dir, training_args,
                            model_args, tokenizer)  # fmt: skip
        logps = read_logps(logp_dir)
        training_args.precompute_ref_log_probs = True  # the trainer then reads them from the batch
    if training_args.data_path:
        if not (Path(training_args.data_path) / "manifest.json").is_file():
            raise PipelineError(
                f"data_path '{training_args.data_path}': not a `pipeline prepare` output (no manifest.json)"
            )
        train_dataset = prepared_pairs(training_args, "train", tokenizer, logps)
        if train_dataset is None:
            raise PipelineError(
                f"data_path '{training_args.data_path}': no pairs/train shards (prepare with views incl. pairs)"
            )
        eval_dataset = prepared_pairs(training_args, "eval", tokenizer, logps)
        train_dataset = limit_rows(train_dataset, data_args.max_train_samples, training_args.seed)
        eval_dataset = limit_rows(eval_dataset, data_args.max_eval_samples, training_args.seed)
    else:
        train_dataset, eval_dataset = load_train_eval(data_args, training_args.seed)
        for name, dataset in (("train_data", train_dataset), ("eval_data", eval_dataset)):
            if dataset is not None and not {"chosen", "rejected"} <= set(dataset.column_names):
                source = data_args.train_data if name == "train_data" else data_args.eval_data
                raise PipelineError(f"{name} '{source}': a preference file needs columns 'chosen' and 'rejected' "
                                    f"(and 'prompt' unless it is implicit); found {dataset.column_names}")  # fmt: skip
    os.makedirs(training_args.output_dir, exist_ok=True)
    log_path = setup_logging(training_args.output_dir)
    setup_tracking(training_args.report_to, training_args.output_dir)
    run = RunInfo(training_args.output_dir, "dpo", (data_args, training_args, model_args), training_args.seed)
    logger.info("dpo: output_dir=%s log=%s; %d train pairs, %s eval pairs", training_args.output_dir, log_path,
                len(train_dataset), len(eval_dataset) if eval_dataset else 0)  # fmt: skip
    set_seed(training_args.seed)
    if eval_dataset is None and training_args.eval_strategy != "no":
        training_args.eval_strategy = "no"

    quantization_config = get_quantization_config(model_args)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    ref_model = None
    if training_args.ref_model_name_or_path and logps is None:
        check_model_dir(training_args.ref_model_name_or_path, "ref_model_name_or_path")
        ref_model = AutoModelForCausalLM.from_pretrained(
            training_args.ref_model_name_or_path, dtype=model_args.dtype or "auto"
        )

    trainer = PipelineDPOTrainer(
        model=model_args.model_name_or_path,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=quantization_config,
        callbacks=[metrics_logging_callback(logging.getLogger("pipeline.dpo.metrics"))],
    )
    if quantization_config is not None:
        keep_bnb_4bit_trainable_on_cpu(trainer.model)

    metrics: dict = {"train_pairs": len(train_dataset), "eval_pairs": len(eval_dataset) if eval_dataset else 0,
                     "reference": "stored logps" if logps is not None else (
                         training_args.ref_model_name_or_path or "starting model")}  # fmt: skip
    return train_evaluate_save(trainer, run, metrics, training_args.output_dir,
                               training_args.resume_from_checkpoint, eval_keys=EVAL_KEYS,
                               merge_lora=data_args.merge_lora)  # fmt: skip
