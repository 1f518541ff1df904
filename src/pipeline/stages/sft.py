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
import os
import shutil
from pathlib import Path

from trl import ModelConfig, SFTConfig

from pipeline.configs import DataArguments, parse_stage_args
from pipeline.data import load_train_eval
from pipeline.runinfo import RunInfo, is_main_process, metrics_logging_callback, setup_logging, setup_tracking

logger = logging.getLogger("pipeline.sft")


def save_final_model(trainer, output_dir: str) -> None:
    """Save model + tokenizer under a temporary folder, then move the files into `output_dir`.

    All ranks must call `save_model` (DeepSpeed/FSDP gather weights there); only the main rank moves files.
    """
    tmp = Path(output_dir) / ".final.tmp"
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if is_main_process():
        for item in tmp.iterdir():
            target = Path(output_dir) / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


def keep_bnb_4bit_trainable_on_cpu(model) -> int:
    """bitsandbytes 0.50 repacks 4-bit weights for fast CPU inference the first time an eval forward runs;
    training steps after that fail ("a view of a leaf Variable ... in-place"). Turn that repacking off.
    Returns the number of 4-bit layers touched."""
    touched = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            touched += 1
    return touched


def main(argv: list[str] | None = None) -> dict:
    data_args, training_args, model_args = parse_stage_args(
        (DataArguments, SFTConfig, ModelConfig), argv, "sft"
    )

    # heavy imports after parsing, so `--help` and recipe errors answer fast
    from transformers import set_seed
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    from pipeline.errors import PipelineError

    if not model_args.model_name_or_path:
        raise PipelineError("model_name_or_path is required (a local folder; try `pipeline tiny-model`)")
    os.makedirs(training_args.output_dir, exist_ok=True)
    log_path = setup_logging(training_args.output_dir)
    setup_tracking(training_args.report_to, training_args.output_dir)
    run = RunInfo(training_args.output_dir, "sft", (data_args, training_args, model_args), training_args.seed)
    logger.info("sft: output_dir=%s log=%s", training_args.output_dir, log_path)
    set_seed(training_args.seed)

    train_dataset, eval_dataset = load_train_eval(data_args, training_args.seed)
    logger.info(
        "sft: %d train rows, %s eval rows", len(train_dataset), len(eval_dataset) if eval_dataset else 0
    )
    if eval_dataset is None and training_args.eval_strategy != "no":
        logger.warning(
            "sft: eval_strategy=%s but no eval_data; evaluation disabled", training_args.eval_strategy
        )
        training_args.eval_strategy = "no"

    quantization_config = get_quantization_config(model_args)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }

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
    try:
        if eval_dataset is not None:
            metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
            logger.info("sft: eval loss before training %.4f", metrics["eval_loss_before"])
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics.update(train_loss=result.training_loss, global_step=result.global_step)
        if eval_dataset is not None:
            metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
            logger.info("sft: eval loss after training %.4f", metrics["eval_loss"])
        save_final_model(trainer, training_args.output_dir)
    except BaseException:
        run.finish(metrics, status="failed")
        raise
    run.data["log_history"] = trainer.state.log_history
    run.finish(metrics)
    logger.info("sft: model saved to %s", training_args.output_dir)
    if hasattr(trainer, "end"):  # transformers >= 5.18 closes trackers / process groups here
        trainer.end()
    return {**metrics, "log_history": trainer.state.log_history}
