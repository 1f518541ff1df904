"""`pipeline ips`: parse → check the logp store → build the rows → train → save."""

from __future__ import annotations

import logging

from trl import ModelConfig

from pipeline import outputs
from pipeline.configs import parse_stage_args
from pipeline.errors import PipelineError
from pipeline.losses import IPSLossConfig
from pipeline.models import check_model_dir
from pipeline.runinfo import RunInfo, metrics_logging_callback, setup_logging, setup_tracking
from pipeline.stages.ips.config import IPSConfig
from pipeline.stages.ips.dataset import IPSCollator, build_dataset, stored_logps
from pipeline.stages.ips.trainer import IPSTrainer, MismatchCheck, starts_from_reference
from pipeline.training import (
    keep_bnb_4bit_trainable_on_cpu,
    model_init_kwargs,
    refuse_resuming_another_run,
    train_evaluate_save,
)

logger = logging.getLogger("pipeline.ips")

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
    from accelerate import PartialState

    state = PartialState()  # every rank builds its share of the tokenized view, then all memory-map it
    with state.main_process_first():  # the reference's hash is computed once, then read from the cache
        logp_dir, response_key, contract = stored_logps(args, model_args, tokenizer)
    reference = args.ref_model_name_or_path or model_args.model_name_or_path
    train_dataset, counts = build_dataset(args, "train", tokenizer, logp_dir, response_key, reference, state)
    if train_dataset is None:
        raise PipelineError(f"{args.data_path}: no rl/train-*.parquet rows")
    eval_dataset, eval_counts = build_dataset(
        args, "eval", tokenizer, logp_dir, response_key, reference, state
    )
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
    args.model_init_kwargs = model_init_kwargs(model_args, args)
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
                               merge_lora=args.merge_lora, save_every_minutes=args.save_every_minutes)  # fmt: skip
