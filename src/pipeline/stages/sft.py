"""SFT stage: a thin wrapper around TRL's `SFTTrainer`, driven by a YAML recipe.

    pipeline sft --config recipes/demo/sft.yaml [--max_steps 20 --output_dir runs/x ...]
    accelerate launch --config_file accelerate_configs/<...>.yaml -m pipeline.cli sft --config ...

Fields: every `SFTConfig` field (TRL), every `ModelConfig` field (model path, dtype, LoRA via `use_peft`,
QLoRA via `load_in_4bit`) and our `DataArguments` (`train_data`/`eval_data` parquet or jsonl files with a
`messages` column, or `prompt`/`completion`, or `text`). Completion-only loss: `assistant_only_loss: true`
for `messages` data (the chat template needs `{% generation %}` markers, which the tiny model's has) or
`completion_only_loss` for prompt/completion data. Packing: `packing: true`.

Writes to `output_dir`: the model (or LoRA adapter) and tokenizer, `run.json` (resolved config, seed, git
commit, versions, host, eval loss before/after) and `run.log`.
"""

from __future__ import annotations

import logging

from trl import ModelConfig, SFTConfig

from pipeline import outputs
from pipeline.configs import DataArguments, parse_stage_args
from pipeline.data import load_train_eval
from pipeline.models import check_model_dir
from pipeline.runinfo import RunInfo, metrics_logging_callback, setup_logging, setup_tracking
from pipeline.training import (
    disable_eval_without_data,
    keep_bnb_4bit_trainable_on_cpu,
    model_init_kwargs,
    refuse_resuming_another_run,
    train_evaluate_save,
)

logger = logging.getLogger("pipeline.sft")


# the dataclasses a recipe of this stage fills (tests/test_configs.py parses every shipped recipe with them)
CONFIG_CLASSES = (DataArguments, SFTConfig, ModelConfig)


def main(argv: list[str] | None = None) -> dict:
    data_args, training_args, model_args = parse_stage_args(CONFIG_CLASSES, argv, "sft")

    # heavy imports after parsing, so `--help` and recipe errors answer fast
    from transformers import set_seed
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    check_model_dir(model_args.model_name_or_path)
    # data problems are reported before anything is written
    train_dataset, eval_dataset = load_train_eval(data_args, training_args.seed)
    configs = (data_args, training_args, model_args)
    outputs.claim(training_args.output_dir, "sft")
    refuse_resuming_another_run(
        training_args.output_dir, "sft", configs, training_args.resume_from_checkpoint
    )
    log_path = setup_logging(training_args.output_dir)
    setup_tracking(training_args.report_to, training_args.output_dir)
    run = RunInfo(training_args.output_dir, "sft", configs, training_args.seed)
    logger.info("sft: output_dir=%s log=%s", training_args.output_dir, log_path)
    set_seed(training_args.seed)
    logger.info(
        "sft: %d train rows, %s eval rows", len(train_dataset), len(eval_dataset) if eval_dataset else 0
    )
    disable_eval_without_data("sft", training_args, eval_dataset)

    quantization_config = get_quantization_config(model_args)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)

    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=quantization_config,
        callbacks=[metrics_logging_callback(logging.getLogger("pipeline.sft.metrics"))],
    )

    if quantization_config is not None:
        keep_bnb_4bit_trainable_on_cpu(trainer.model)

    metrics: dict = {"train_rows": len(train_dataset), "eval_rows": len(eval_dataset) if eval_dataset else 0}
    return train_evaluate_save(
        trainer, run, metrics, training_args.output_dir, training_args.resume_from_checkpoint,
        merge_lora=data_args.merge_lora,
        save_every_minutes=data_args.save_every_minutes,
    )  # fmt: skip
