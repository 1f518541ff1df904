"""GRPO stage: a thin wrapper around TRL's `GRPOTrainer`, driven by a YAML recipe (online RL from prompts).

    pipeline grpo --config recipes/demo/grpo.yaml [--max_steps 20 --output_dir runs/x ...]
    accelerate launch --config_file accelerate_configs/<...>.yaml -m pipeline.cli grpo --config ...

Fields: every `GRPOConfig` field (TRL: `num_generations`, `max_completion_length`, `temperature`, `beta`,
`loss_type`, `reward_weights`, and the vLLM options `use_vllm`, `vllm_mode: colocate|server`, ... which pass
straight through for GPU users; without them generation is the model's own `generate`), every
`ModelConfig` field (LoRA via `use_peft`, QLoRA via `load_in_4bit`), our `DataArguments` and the
`RewardArguments` below.

Prompts (`train_data`, optional `eval_data`; parquet/jsonl/json): rows with a `prompt` column (a chat message
list or plain text), or `messages` (the conversation up to its last non-assistant turn is the prompt), or
`prompt_pretokenized` (a JSON chat, as in `pipeline synthetic-data`'s coderl files). The last two are
reduced to one row per distinct prompt. Every other column reaches the reward functions as a keyword:

- `code_execution` (default): runs each completion (one code fence stripped) against the row's `tests`
  (a list of `assert` statements) in the sandbox; reward `2 * pass_fraction - 1`. The synthetic task's
  files carry no `tests`; `synthetic_task_seed` (the `--seed` given to `pipeline synthetic-data`) adds them
  by `task_id`.
- `humaneval`: HumanEval-format rows (`test`, `entry_point`, optional `code_prompt`); reward 1 or 0.
- `reward_model`: the scalar reward model in `reward_model_path` (a `pipeline rm` output).

Several names, comma-separated, are summed (weighted by `reward_weights`).

Bad input (no prompt column, an unknown reward name, a column a reward needs missing, a reward model folder
that is not one, an eval batch that does not hold whole prompt groups) is a one-line `PipelineError` before
anything is written. On CPU keep `use_vllm: false` (the default); `per_device_train_batch_size` counts
completions (a generation batch holds whole groups of `num_generations` per prompt).

Writes to `output_dir`: the model (or LoRA adapter) and tokenizer, `run.json` (resolved config, seed, git
commit, versions, host; metrics: mean train reward of the first and last logging windows `reward_start`,
`reward_end`, and with `eval_data` the mean sampled reward on it before and after, `eval_reward_before`,
`eval_reward`) and `run.log`. `pipeline rloo` (stages/rloo.py) shares all of this.
"""

from __future__ import annotations

import logging

from trl import GRPOConfig, ModelConfig

from pipeline import outputs
from pipeline.configs import DataArguments, parse_stage_args
from pipeline.data import load_train_eval
from pipeline.errors import PipelineError
from pipeline.models import check_model_dir
from pipeline.rewards.online import RewardArguments, build_reward_funcs, prompt_dataset, reward_names
from pipeline.runinfo import RunInfo, metrics_logging_callback, setup_logging, setup_tracking
from pipeline.training import (
    disable_eval_without_data,
    keep_bnb_4bit_trainable_on_cpu,
    model_init_kwargs,
    refuse_resuming_another_run,
    run_training,
    save_final_model,
)
from pipeline.training.save_timer import SaveEveryMinutes

# ------------------------------------------------------------------------------------------------ rewards


# ------------------------------------------------------------------------------------------------ prompts


# ------------------------------------------------------------------------------------------------ stage


def _mean_reward(log_history: list[dict], first: bool) -> float | None:
    values = [h["reward"] for h in log_history if h.get("reward") is not None and "eval_reward" not in h]
    if not values:
        return None
    return values[0] if first else values[-1]


def check_inputs(stage: str, data_args, reward_args, training_args, model_args):
    """Every input checked before anything is written: (reward names, train prompts, eval prompts or None)."""
    names = reward_names(reward_args)
    check_model_dir(model_args.model_name_or_path)
    if training_args.use_vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise PipelineError(
                "use_vllm: the vllm package is not installed (a GPU option; set use_vllm false)"
            )
    train_rows, eval_rows = load_train_eval(data_args, training_args.seed)
    train_dataset = prompt_dataset(train_rows, "train_data", names, reward_args)
    eval_dataset = prompt_dataset(eval_rows, "eval_data", names, reward_args) if eval_rows else None
    if eval_dataset is not None:
        n_eval = training_args.num_generations_eval or training_args.num_generations
        if (training_args.per_device_eval_batch_size * training_args.world_size) % n_eval:
            raise PipelineError(
                f"per_device_eval_batch_size ({training_args.per_device_eval_batch_size}) x processes must be "
                f"divisible by num_generations_eval ({n_eval}), the completions sampled per eval prompt"
            )
    disable_eval_without_data(stage, training_args, eval_dataset)
    return names, train_dataset, eval_dataset


def build_trainer(stage: str, trainer_name: str, names, reward_args, training_args, model_args, train_dataset,
                  eval_dataset):  # fmt: skip
    """TRL's trainer (`trainer_name`) with our reward functions, model settings and metrics logging."""
    import trl
    from trl import get_peft_config, get_quantization_config

    quantization_config = get_quantization_config(model_args)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    reward_funcs, reward_processing = build_reward_funcs(
        names, reward_args, model_args.dtype, as_functions=True
    )
    trainer = getattr(trl, trainer_name)(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        reward_processing_classes=reward_processing,
        peft_config=get_peft_config(model_args),
        quantization_config=quantization_config,
        callbacks=[metrics_logging_callback(logging.getLogger(f"pipeline.{stage}.metrics"))],
    )
    if quantization_config is not None:
        keep_bnb_4bit_trainable_on_cpu(trainer.model)
    return trainer


def train_and_save(trainer, log, training_args, merge_lora: bool, metrics: dict) -> None:
    """Eval reward before, training (resume, OOM back-off), eval reward after, the final model."""
    has_eval = trainer.eval_dataset is not None
    if has_eval:
        metrics["eval_reward_before"] = trainer.evaluate()["eval_reward"]
        log.info("mean eval reward before training %.4f", metrics["eval_reward_before"])
    result, info = run_training(trainer, training_args.resume_from_checkpoint)
    history = trainer.state.log_history
    metrics.update(**info, train_loss=result.training_loss, global_step=result.global_step,
                   reward_start=_mean_reward(history, first=True), reward_end=_mean_reward(history, first=False))  # fmt: skip
    log.info(
        "mean train reward: first logging window %s, last %s", metrics["reward_start"], metrics["reward_end"]
    )
    if has_eval:
        metrics["eval_reward"] = trainer.evaluate()["eval_reward"]
        log.info("mean eval reward after training %.4f", metrics["eval_reward"])
    save_final_model(trainer, training_args.output_dir, merge_lora)


def run_online_rl(stage: str, config_class, trainer_name: str, argv: list[str] | None) -> dict:
    """The whole stage for an online RL trainer of TRL with GRPOTrainer's interface (GRPO, RLOO)."""
    data_args, reward_args, training_args, model_args = parse_stage_args(
        (DataArguments, RewardArguments, config_class, ModelConfig), argv, stage
    )
    log = logging.getLogger(f"pipeline.{stage}")
    from transformers import set_seed  # heavy imports after parsing: `--help` and recipe errors answer fast

    names, train_dataset, eval_dataset = check_inputs(
        stage, data_args, reward_args, training_args, model_args
    )
    configs = (data_args, reward_args, training_args, model_args)
    outputs.claim(training_args.output_dir, stage)
    refuse_resuming_another_run(
        training_args.output_dir, stage, configs, training_args.resume_from_checkpoint
    )
    log_path = setup_logging(training_args.output_dir)
    setup_tracking(training_args.report_to, training_args.output_dir)
    run = RunInfo(training_args.output_dir, stage, configs, training_args.seed)
    log.info("%s: output_dir=%s log=%s", stage, training_args.output_dir, log_path)
    set_seed(training_args.seed)
    log.info("%s: %d train prompts, %d eval prompts, rewards %s", stage, len(train_dataset),
             len(eval_dataset) if eval_dataset else 0, ", ".join(names))  # fmt: skip
    trainer = build_trainer(stage, trainer_name, names, reward_args, training_args, model_args, train_dataset,
                            eval_dataset)  # fmt: skip
    metrics: dict = {
        "train_prompts": len(train_dataset),
        "eval_prompts": len(eval_dataset) if eval_dataset else 0,
    }
    try:
        if data_args.save_every_minutes:
            trainer.add_callback(SaveEveryMinutes(data_args.save_every_minutes))
        train_and_save(trainer, log, training_args, data_args.merge_lora, metrics)
    except BaseException:
        run.finish(metrics, status="failed")
        raise
    run.data["log_history"] = trainer.state.log_history
    run.finish(metrics)
    log.info("model saved to %s", training_args.output_dir)
    if hasattr(trainer, "end"):  # transformers >= 5.18 closes trackers / process groups here
        trainer.end()
    return {**metrics, "log_history": trainer.state.log_history}


# the dataclasses a recipe of this stage fills (tests/test_configs.py parses every shipped recipe with them)
CONFIG_CLASSES = (DataArguments, RewardArguments, GRPOConfig, ModelConfig)


def main(argv: list[str] | None = None) -> dict:
    return run_online_rl("grpo", GRPOConfig, "GRPOTrainer", argv)
