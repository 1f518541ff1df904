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

from pipeline.stages.grpo import run_online_rl


def main(argv: list[str] | None = None) -> dict:
    return run_online_rl("rloo", RLOOConfig, "RLOOTrainer", argv)
