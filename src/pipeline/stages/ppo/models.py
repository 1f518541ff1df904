"""The policy, its frozen reference, the critic (value head) and the reward models PPO loads."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from trl import ModelConfig

from pipeline.errors import PipelineError
from pipeline.rewards.online import RewardArguments
from pipeline.stages.ppo.config import PPOStageConfig

log = logging.getLogger("pipeline.ppo")


class PolicyAndValue(torch.nn.Module):
    """Policy LM and critic as one module, so one optimizer and one DDP/DeepSpeed wrapper train both."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic
        self.config = policy.config  # what DeepSpeed reads to size its buckets ("auto" entries)

    def forward(self, input_ids, attention_mask, position_ids):
        logits = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits
        return logits, token_values(self.critic, input_ids, attention_mask, position_ids)


def token_values(critic, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """The critic's scalar head applied at every position (a reward model only reads the last one)."""
    seq_cls = critic.get_base_model() if hasattr(critic, "get_base_model") else critic
    hidden = seq_cls.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return seq_cls.score(hidden).squeeze(-1).float()


def load_models(args: PPOStageConfig, model_args: ModelConfig, reward_args: RewardArguments, dtype):
    """(tokenizer, policy, reference or None, critic). With LoRA the reference is the policy, adapter off."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import get_peft_config

    from pipeline.models import load_reward_model

    path = model_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise PipelineError(f"model_name_or_path: the tokenizer in '{path}' has no eos_token; PPO needs one")
    kwargs = {"dtype": dtype, "attn_implementation": model_args.attn_implementation}
    policy = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    peft_config = get_peft_config(model_args)
    reference = None
    if peft_config is not None:
        if args.ref_model_name_or_path:
            raise PipelineError(
                "ref_model_name_or_path cannot be combined with use_peft (the base is the reference)"
            )
        policy = get_peft_model(policy, peft_config)
    else:
        reference = AutoModelForCausalLM.from_pretrained(args.ref_model_name_or_path or path, **kwargs)
        reference.requires_grad_(False).eval()

    value_path, key = critic_source(args, reward_args, path)
    if is_causal_lm_dir(value_path):  # its weights and a zero value head: V = 0 until it learns
        critic = AutoModelForSequenceClassification.from_pretrained(value_path, num_labels=1, **kwargs)
        torch.nn.init.zeros_(critic.score.weight)
    else:
        _, critic = load_reward_model(value_path, key=key, **kwargs)
        if hasattr(critic, "merge_and_unload"):
            critic = critic.merge_and_unload()
    critic.config.pad_token_id = tokenizer.pad_token_id
    if peft_config is not None:
        critic = get_peft_model(critic, replace(peft_config, task_type="SEQ_CLS", modules_to_save=["score"]))
    if args.gradient_checkpointing:
        for model in (policy, critic):
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
    return tokenizer, policy, reference, critic


def critic_source(args: PPOStageConfig, reward_args: RewardArguments, policy_path: str) -> tuple[str, str]:
    """(folder the critic starts from, the config key that named it)."""
    if args.value_model_path:
        return args.value_model_path, "value_model_path"
    if reward_args.reward_model_path:
        return reward_args.reward_model_path, "reward_model_path (the critic's default start)"
    return policy_path, "model_name_or_path"


def check_critic_tokenizer(args: PPOStageConfig, reward_args: RewardArguments, policy_path: str) -> None:
    """The critic reads the policy's token ids, so it must share the policy's tokenizer. (A reward model
    with another tokenizer is fine as a *scorer*: it re-tokenizes the text.)"""
    from transformers import AutoTokenizer

    from pipeline.tokenization import tokenizer_fingerprint

    value_path, key = critic_source(args, reward_args, policy_path)
    if value_path == policy_path:
        return
    if tokenizer_fingerprint(AutoTokenizer.from_pretrained(value_path)) != tokenizer_fingerprint(
        AutoTokenizer.from_pretrained(policy_path)
    ):
        raise PipelineError(
            f"{key}: '{value_path}' has a different tokenizer from the policy's, and the critic reads the "
            "policy's tokens; set value_model_path to a model with the policy's tokenizer (e.g. the SFT model)"
        )


def is_causal_lm_dir(path: str) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForCausalLM") for a in architectures)
