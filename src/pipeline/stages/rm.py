"""Reward-model stage: a thin wrapper around TRL's `RewardTrainer`, driven by a YAML recipe.

    pipeline rm --config recipes/demo/rm.yaml [--max_steps 20 --output_dir runs/x ...]
    accelerate launch --config_file accelerate_configs/<...>.yaml -m pipeline.cli rm --config ...

Fields: every `RewardConfig` field (TRL), every `ModelConfig` field (model path, dtype, LoRA via `use_peft`,
QLoRA via `load_in_4bit`) and our `DataArguments` (`train_data`/`eval_data`: preference parquet or jsonl
files, a glob or a folder). `train_data` may name a `pipeline prepare` output or its `pairs` folder: its train
shards are trained on and its eval shards (unless `eval_data` is set) evaluated. Preference rows have `chosen`
and `rejected` (chat messages or text) and optionally `prompt` (explicit prompt); without `prompt` each side
is the whole conversation. Other columns are ignored. Pairs with a side longer than `max_length` tokens are
dropped by TRL (the log says how many).

The model is loaded with `AutoModelForSequenceClassification` (`num_labels=1`; a causal LM such as an SFT
model gets a new random scalar head). LoRA trains with task type `SEQ_CLS` (the head is trained in full).

Writes to `output_dir`: the reward model (or LoRA adapter) and tokenizer, with `pad_token_id` set in its config,
`run.json` (resolved config, seed, git commit, versions, host, eval loss, accuracy, tie rate and mean reward
margin chosen − rejected before/after) and `run.log`. Accuracy is over pooled pairs with a tie counted ½
(`pipeline.training.reward_accuracy`; TRL's own averages per-batch means and counts a tie wrong). Later stages check the folder with
`pipeline.models.check_reward_model_dir` and load it with `pipeline.models.load_reward_model` (or `AutoModelForSequenceClassification` for a full model).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from trl import ModelConfig, RewardConfig

from pipeline import outputs
from pipeline.configs import DataArguments, parse_stage_args
from pipeline.data import FORMATS, load_train_eval, resolve_files
from pipeline.errors import PipelineError
from pipeline.models import check_model_dir
from pipeline.runinfo import RunInfo, metrics_logging_callback, setup_logging, setup_tracking
from pipeline.training import (
    disable_eval_without_data,
    keep_bnb_4bit_trainable_on_cpu,
    model_init_kwargs,
    refuse_resuming_another_run,
    train_evaluate_save,
)

logger = logging.getLogger("pipeline.rm")

PREFERENCE_COLUMNS = ("chosen", "rejected")
# eval metrics of RewardTrainer recorded before and after training (besides eval_loss)
EVAL_KEYS = ("accuracy", "margin", "ties")


# ------------------------------------------------------------------------------------ reward-model folders


# ------------------------------------------------------------------------------------ preference data


def file_columns(path: str) -> list[str] | None:
    """Column names of a parquet file (footer) or of the first record of a json/jsonl file; None if unknown
    (the loader then reports the file's problem)."""
    try:
        if FORMATS.get(Path(path).suffix) == "parquet":
            import pyarrow.parquet as pq

            return pq.read_schema(path).names
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    record = json.loads(line)
                    return list(record) if isinstance(record, dict) else None
    except Exception:
        return None
    return None


def use_pairs_view(data_args: DataArguments) -> str | None:
    """`train_data` naming a `pipeline prepare` output folder, or its `pairs` folder, means that pairs view:
    its train shards for training and, unless `eval_data` is set, its eval shards for evaluation. Rewrites
    `data_args` (so run.json records the shards' globs) and returns the view folder, or None."""
    spec = data_args.train_data
    if not spec or not os.path.isdir(spec):
        return None
    folder = Path(spec)
    if (folder / "manifest.json").is_file():  # the prepare output itself
        if not (folder / "pairs").is_dir():
            raise PipelineError(
                f"train_data: '{spec}' is a `pipeline prepare` output without a pairs view (no two responses to "
                "one prompt differ by pair_margin, or `pairs` was not among --views)"
            )
        folder = folder / "pairs"
    if not any(folder.glob("train-*.parquet")):
        return None  # an ordinary folder of preference files
    data_args.train_data = str(folder / "train-*.parquet")
    if data_args.eval_data is None and any(folder.glob("eval-*.parquet")):
        data_args.eval_data = str(folder / "eval-*.parquet")
    return str(folder)


def check_preference_files(spec: str | None, what: str) -> None:
    """Every file of a data spec has `chosen` and `rejected`: the first that lacks one is named."""
    if not spec:
        return
    for path in resolve_files(spec, what):
        columns = file_columns(path)
        if columns is not None:
            check_preference_columns(columns, f"{what}: {path}")


def check_preference_columns(columns, where: str) -> None:
    missing = [c for c in PREFERENCE_COLUMNS if c not in columns]
    if missing:
        raise PipelineError(
            f"{where}: missing column '{missing[0]}' (preference data needs 'chosen' and 'rejected', optionally "
            f"'prompt'); columns are {list(columns)}"
        )


def count_kept_pairs(trainer, train_dataset, eval_dataset, run: RunInfo) -> dict:
    """RewardTrainer drops pairs with a side longer than `max_length`: say how many, and stop (one line) if
    a split is left empty. Returns {"train_rows": n, "eval_rows": n}."""
    max_length = trainer.args.max_length
    counts = {}
    for split, given, kept in (
        ("train", train_dataset, trainer.train_dataset),
        ("eval", eval_dataset, trainer.eval_dataset),
    ):
        counts[f"{split}_rows"] = len(kept) if given is not None else 0
        if given is None:
            continue
        if len(kept) < len(given):
            logger.warning(
                "rm: %d of %d %s pairs have a side longer than max_length=%s tokens and are dropped",
                len(given) - len(kept), len(given), split, max_length,
            )  # fmt: skip
        if len(kept) == 0:
            run.finish(counts, status="failed")
            raise PipelineError(
                f"{split} data: every pair has a side longer than max_length={max_length} tokens; raise max_length"
            )
    logger.info("rm: %d train pairs, %d eval pairs", counts["train_rows"], counts["eval_rows"])
    return counts


def record_eval_metrics(trainer, metrics: dict) -> None:
    """`train_evaluate_save` keeps eval_loss; also keep RewardTrainer's eval accuracy and mean margin
    (chosen − rejected): the first evaluation as `eval_<key>_before`, the latest as `eval_<key>`."""
    evaluate = trainer.evaluate

    def evaluate_and_record(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        first = "eval_accuracy_before" not in metrics and "eval_accuracy" not in metrics
        for name in EVAL_KEYS:
            if f"eval_{name}" in result:
                metrics[f"eval_{name}_before" if first else f"eval_{name}"] = result[f"eval_{name}"]
        if first and "eval_accuracy" in result:
            logger.info(
                "eval accuracy before training %.4f, margin %.4f",
                result["eval_accuracy"],
                result["eval_margin"],
            )
        elif "eval_accuracy" in result:
            logger.info("eval accuracy %.4f, margin %.4f", result["eval_accuracy"], result["eval_margin"])
        return result

    trainer.evaluate = evaluate_and_record


# ------------------------------------------------------------------------------------ stage


# the dataclasses a recipe of this stage fills (tests/test_configs.py parses every shipped recipe with them)
CONFIG_CLASSES = (DataArguments, RewardConfig, ModelConfig)


def main(argv: list[str] | None = None) -> dict:
    data_args, training_args, model_args = parse_stage_args(CONFIG_CLASSES, argv, "rm")

    # heavy imports after parsing, so `--help` and recipe errors answer fast
    from transformers import set_seed
    from trl import get_peft_config, get_quantization_config

    from pipeline.training.reward_accuracy import PooledAccuracyRewardTrainer

    check_model_dir(model_args.model_name_or_path)
    if model_args.use_peft and model_args.lora_task_type != "SEQ_CLS":
        # a reward model is a sequence classifier: PEFT then also trains (and saves) the new `score` head
        model_args.lora_task_type = "SEQ_CLS"
    # data problems are reported before anything is written
    view = use_pairs_view(data_args)
    check_preference_files(data_args.train_data, "train_data")
    check_preference_files(data_args.eval_data, "eval_data")
    train_dataset, eval_dataset = load_train_eval(data_args, training_args.seed)
    check_preference_columns(
        train_dataset.column_names, f"train data {data_args.train_data or data_args.dataset_name}"
    )
    if eval_dataset is not None:
        check_preference_columns(
            eval_dataset.column_names, f"eval data {data_args.eval_data or data_args.dataset_name}"
        )
    configs = (data_args, training_args, model_args)
    outputs.claim(training_args.output_dir, "rm")
    refuse_resuming_another_run(training_args.output_dir, "rm", configs, training_args.resume_from_checkpoint)
    log_path = setup_logging(training_args.output_dir)
    setup_tracking(training_args.report_to, training_args.output_dir)
    run = RunInfo(training_args.output_dir, "rm", configs, training_args.seed)
    logger.info("rm: output_dir=%s log=%s", training_args.output_dir, log_path)
    if view:
        logger.info(
            "rm: pairs view %s: train_data=%s eval_data=%s", view, data_args.train_data, data_args.eval_data
        )
    set_seed(training_args.seed)
    disable_eval_without_data("rm", training_args, eval_dataset)

    quantization_config = get_quantization_config(model_args)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)

    trainer = PooledAccuracyRewardTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=quantization_config,
        callbacks=[metrics_logging_callback(logging.getLogger("pipeline.rm.metrics"))],
    )
    if quantization_config is not None:
        keep_bnb_4bit_trainable_on_cpu(trainer.model)

    metrics: dict = count_kept_pairs(trainer, train_dataset, eval_dataset, run)
    record_eval_metrics(trainer, metrics)
    return train_evaluate_save(
        trainer, run, metrics, training_args.output_dir, training_args.resume_from_checkpoint,
        merge_lora=data_args.merge_lora,
        save_every_minutes=data_args.save_every_minutes,
    )  # fmt: skip
