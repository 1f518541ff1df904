"""RLOO stage: a thin wrapper around TRL's `RLOOTrainer` (REINFORCE with a leave-one-out baseline: each
completion's advantage is its reward minus the mean reward of the other completions of its prompt).

    pipeline rloo --config recipes/demo/rloo.yaml [--max_steps 20 --output_dir runs/x ...]
    accelerate launch --config_file accelerate_configs/<...>.yaml -m pipeline.cli rloo --config ...

Same prompts, rewards (`reward_funcs`: code_execution, humaneval, reward_model), outputs and metrics as
`pipeline grpo` (see stages/grpo.py); the trainer fields are `RLOOConfig`'s (`num_generations`, `beta`,
`normalize_advantages`, `reward_clip_range`, vLLM options, ...).
"""

from __future__ import annotations

from trl import RLOOConfig

from pipeline.configs import DataArguments, ModelConfig
from pipeline.rewards.online import RewardArguments
from pipeline.stages.grpo import run_online_rl

# the dataclasses a recipe of this stage fills (tests/test_configs.py parses every shipped recipe with them)
CONFIG_CLASSES = (DataArguments, RewardArguments, RLOOConfig, ModelConfig)


def main(argv: list[str] | None = None) -> dict:
    return run_online_rl("rloo", RLOOConfig, "RLOOTrainer", argv)
