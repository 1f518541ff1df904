"""Pieces every training stage shares: model-path checks, the train/evaluate/save sequence, final saving."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.resilience import merge_saved_adapter, run_training
from pipeline.runinfo import RunInfo, is_main_process

logger = logging.getLogger("pipeline")


def check_model_dir(path: str | None, key: str = "model_name_or_path") -> str:
    """A local model folder (no hub here): one clear line instead of a loader traceback."""
    if not path:
        raise PipelineError(f"{key} is required (a local model folder; `pipeline tiny-model` makes one)")
    folder = Path(path)
    if not folder.is_dir():
        raise PipelineError(f"{key}: folder not found: '{path}'")
    if not any((folder / name).is_file() for name in ("config.json", "adapter_config.json", "tokenizer.json",
                                                       "tokenizer_config.json")):  # fmt: skip
        raise PipelineError(f"{key}: '{path}' holds no config.json or tokenizer files")
    return path


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


FINAL_RECORD = ".pipeline_final_model.json"  # the entries of output_dir that the last final save wrote
# what a final save of an earlier version may have left (those folders have no record)
_MODEL_ENTRIES = ("config.json", "generation_config.json", "adapter_config.json", "adapter_model.safetensors",
                  "adapter_model.bin", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                  "vocab.json", "merges.txt", "added_tokens.json", "README.md", "training_args.bin", "adapter")  # fmt: skip


def final_tmp(output_dir: str | os.PathLike) -> Path:
    """The empty folder a final model is assembled in (what a killed save left there is cleared)."""
    tmp = Path(output_dir) / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def swap_in_final_model(tmp: Path, output_dir: str | os.PathLike) -> None:
    """Replace the final model in `output_dir` by the one assembled in `tmp`: every entry of the previous
    final save (its record, or the usual model files for older folders) moves aside, the new entries move
    in, then the old ones are deleted. No file of an older model (an `adapter_config.json` next to a new
    full model) survives, and nothing else in `output_dir` (run.json, checkpoints) is touched."""
    import json

    out = Path(output_dir)
    record = out / FINAL_RECORD
    try:
        previous = json.loads(record.read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        previous = [*_MODEL_ENTRIES, *(p.name for p in out.glob("model-*-of-*.safetensors"))]
    aside = out / ".final.old"
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    record.unlink(missing_ok=True)  # from here until the new record, the folder holds no claimed model
    for name in previous:
        if (out / name).exists() and not name.startswith("."):
            os.replace(out / name, aside / name)
    entries = sorted(p.name for p in tmp.iterdir())
    for name in entries:
        os.replace(tmp / name, out / name)
    record_tmp = out / f".{FINAL_RECORD}.tmp"
    record_tmp.write_text(json.dumps({"entries": entries}) + "\n")
    os.replace(record_tmp, record)
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def save_final_model(trainer, output_dir: str, merge_lora: bool = False) -> None:
    """Save model + tokenizer into an empty temporary folder, then swap it in (`swap_in_final_model`).

    All ranks must call `save_model` (DeepSpeed/FSDP gather weights there); only the main rank moves files.
    `merge_lora`: a LoRA adapter is merged into its base first, so the folder is a plain model (the adapter
    goes to `adapter/`).
    """
    if is_main_process():
        final_tmp(output_dir)
    trainer.accelerator.wait_for_everyone()
    tmp = Path(output_dir) / ".final.tmp"
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if is_main_process():
        if merge_lora and not merge_saved_adapter(tmp):
            logger.warning("merge_lora: no LoRA adapter to merge (use_peft is off); saved the model as it is")
        swap_in_final_model(tmp, output_dir)
    trainer.accelerator.wait_for_everyone()


def train_evaluate_save(
    trainer, run: RunInfo, metrics: dict, output_dir: str, resume_from_checkpoint=None, eval_keys=(),
    merge_lora: bool = False,
) -> dict:  # fmt: skip
    """Eval loss before, training, eval loss after, final save, run.json; returns metrics + log history.

    Training resumes from the last complete checkpoint in `output_dir` unless `resume_from_checkpoint` is
    false, and backs off on out-of-memory errors (`pipeline.resilience.run_training`).
    `eval_keys`: further eval metrics (without the `eval_` prefix) recorded before and after as well."""
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
