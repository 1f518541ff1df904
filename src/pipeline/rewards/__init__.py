"""Rewards: code-execution reward functions in TRL's form (`code`), and the reward setup the online RL
stages and eval share: which rewards score a completion, how they are built, and the prompt rows they read
(`online`)."""

from pipeline.rewards.code import (
    code_execution_reward,
    completion_text,
    humaneval_reward,
    reward_from_fraction,
)

__all__ = ["code_execution_reward", "completion_text", "humaneval_reward", "reward_from_fraction"]
