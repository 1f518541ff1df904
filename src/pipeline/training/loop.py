"""The train / evaluate / save sequence every TRL-based stage runs, and the model settings they share."""

from __future__ import annotations

import logging

from pipeline.runinfo import RunInfo
from pipeline.training.final_model import save_final_model
from pipeline.training.oom import run_training

logger = logging.getLogger("pipeline")


def disable_eval_without_data(stage: str, training_args, eval_dataset) -> None:
    """An eval_strategy with no eval data would fail at the first evaluation: turn it off, and say so."""
    if eval_dataset is None and training_args.eval_strategy != "no":
        logger.warning(
            "%s: eval_strategy=%s but no eval_data; evaluation disabled", stage, training_args.eval_strategy
        )
        training_args.eval_strategy = "no"


def model_init_kwargs(model_args, training_args) -> dict:
    """How a trainer loads the model from a path: ModelConfig's revision/attention/dtype and the config's
    trust_remote_code, under whatever `model_init_kwargs` the recipe set itself."""
    return {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }


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


def train_evaluate_save(
    trainer, run: RunInfo, metrics: dict, output_dir: str, resume_from_checkpoint=None, eval_keys=(),
    merge_lora: bool = False, save_every_minutes: float | None = None,
) -> dict:  # fmt: skip
    """Eval loss before, training, eval loss after, final save, run.json; returns metrics + log history.

    Training resumes from the last complete checkpoint in `output_dir` unless `resume_from_checkpoint` is
    false, and backs off on out-of-memory errors (`pipeline.training.run_training`).
    `eval_keys`: further eval metrics (without the `eval_` prefix) recorded before and after as well.
    `save_every_minutes`: checkpoints by the clock too (`pipeline.training.save_timer`)."""
    timer = None
    if save_every_minutes:
        from pipeline.training.save_timer import SaveEveryMinutes

        timer = SaveEveryMinutes(save_every_minutes)
        trainer.add_callback(timer)
    has_eval = trainer.eval_dataset is not None
    # Under DeepSpeed, an evaluate() before train() builds an inference-only engine: ZeRO-1/2 refuse it and
    # ZeRO-3 then trains without an engine. So the "before" numbers are skipped there (said in the log).
    eval_before = has_eval and not getattr(trainer, "is_deepspeed_enabled", False)
    if has_eval and not eval_before:
        logger.info(
            "DeepSpeed: no eval before training (its engine is built for training first); eval after runs"
        )
    try:
        if eval_before:
            before = trainer.evaluate()
            metrics["eval_loss_before"] = before["eval_loss"]
            metrics.update(
                {f"eval_{k}_before": before[f"eval_{k}"] for k in eval_keys if f"eval_{k}" in before}
            )
            logger.info("eval loss before training %.4f", metrics["eval_loss_before"])
        result, info = run_training(trainer, resume_from_checkpoint)
        metrics.update(train_loss=result.training_loss, global_step=result.global_step, **info)
        if timer is not None:
            metrics["save_every_steps"] = timer.interval
        if has_eval:
            after = trainer.evaluate()
            metrics["eval_loss"] = after["eval_loss"]
            metrics.update({f"eval_{k}": after[f"eval_{k}"] for k in eval_keys if f"eval_{k}" in after})
            logger.info("eval loss after training %.4f", metrics["eval_loss"])
        save_final_model(trainer, output_dir, merge_lora)
    except BaseException:
        run.finish(metrics, status="failed")
        raise
    run.data["log_history"] = trainer.state.log_history
    run.finish(metrics)
    logger.info("model saved to %s", output_dir)
    if hasattr(trainer, "end"):  # transformers >= 5.18 closes trackers / process groups here
        trainer.end()
    return {**metrics, "log_history": trainer.state.log_history}
