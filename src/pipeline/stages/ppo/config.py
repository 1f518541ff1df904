"""What `pipeline ppo` is told: TrainingArguments plus PPO's own knobs."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from transformers import TrainingArguments

from pipeline.losses import (
    KL_ESTIMATORS,
)

log = logging.getLogger("pipeline.ppo")


CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


STATE_FILE = "ppo_state.json"


@dataclass
class PPOStageConfig(TrainingArguments):
    """`TrainingArguments` plus PPO's own knobs. `max_steps` counts PPO updates (rollout batches)."""

    trust_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "Allow resuming a DeepSpeed checkpoint (its reader unpickles files: only for "
            "checkpoints this run wrote)."
        },
    )
    # rollout
    max_prompt_length: int = field(
        default=512, metadata={"help": "Prompts longer than this (tokens) are dropped."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Longest sampled response, in tokens."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (log-probs use it too)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    missing_eos_penalty: float | None = field(
        default=1.0, metadata={"help": "Subtracted from the score of a response that ends without EOS."}
    )
    score_clip: float | None = field(
        default=None, metadata={"help": "Clip scores to [-score_clip, score_clip]."}
    )
    # PPO
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Mini-batches (optimizer steps) per pass."})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip ε."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip around the rollout's values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    ent_coef: float = field(default=0.0, metadata={"help": "Weight of the entropy bonus."})
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Rescale per-token rewards to unit variance."}
    )
    kl_coef: float = field(
        default=0.05, metadata={"help": "β, the per-token KL penalty (initial value if adaptive)."}
    )
    kl_estimator: str = field(default="k1", metadata={"help": "Per-token KL(πθ‖π_ref) estimate: k1 or k3."})
    kl_target: float | None = field(
        default=None, metadata={"help": "Adaptive β: target KL per sequence (nats). Default: β fixed."}
    )
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive β: sequences over which β adapts."})
    # models
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reference model folder. Default: the starting policy (adapter off with LoRA)."},
    )
    value_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Critic initialisation. Default: reward_model_path, else the policy + a zero value head."
        },
    )
    num_eval_samples: int = field(default=4, metadata={"help": "Sampled responses per eval prompt."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N updates."})

    def __post_init__(self):
        super().__post_init__()
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got '{self.kl_estimator}'"
            )
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (PPO samples its rollouts)")
        if self.num_mini_batches < 1 or self.num_ppo_epochs < 1:
            raise ValueError("num_mini_batches and num_ppo_epochs must be >= 1")
