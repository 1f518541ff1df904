"""pipeline: LLM post-training stages (SFT, RM, DPO, GRPO/RLOO, PPO, offline logps, IPS) driven by YAML recipes."""

__version__ = "0.1.0"
