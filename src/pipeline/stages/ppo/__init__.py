"""PPO stage (our own: TRL 1.16 has no PPOTrainer): policy, frozen reference, reward, and a critic.

    pipeline ppo --config recipes/demo/ppo.yaml [--max_steps 20 --kl_coef 0.05 ...]
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml -m pipeline.cli ppo --config ...

One PPO *update* (what `max_steps` counts), `train` in stage.py, reading top to bottom:

1. **Rollout.** Each process takes `per_device_train_batch_size × gradient_accumulation_steps ×
   num_mini_batches` prompts and samples one response each with the policy's `generate` (`temperature`,
   `top_p`, `max_new_tokens`); tokens after the first EOS are dropped.
2. **Scoring, without gradient.** Token log-probs under the policy (at the sampling temperature) and the
   reference, the critic's value before every response token, and one score per response: the reward
   model in `reward_model_path` (the response is re-tokenized with *its* tokenizer and chat template, so a
   reward model with another tokenizer scores the text it was trained on) and/or sandboxed code execution
   (`reward_funcs`, as in `pipeline grpo`). A response that never emits EOS loses `missing_eos_penalty`.
3. **Advantages.** Per-token reward r_t = −β·KL_t (`kl_estimator` k1 or k3 of KL(πθ‖π_ref)), plus the
   score on the last token; optionally rescaled (`whiten_rewards`); GAE with `gamma`, `lam`; advantages
   whitened over the batch's response tokens. β is `kl_coef`, adapted towards `kl_target` if set.
4. **Update.** `num_ppo_epochs` passes over the rollout batch in `num_mini_batches` shuffled mini-batches
   (one optimizer step each): clipped policy loss (`cliprange`) + `vf_coef` × clipped value loss
   (`cliprange_value`) − `ent_coef` × entropy.

Losses and estimators live in `pipeline/losses.py` (pinned by tests on hand-computed tensors).

Models: the policy starts from `model_name_or_path` (the SFT model). The reference is a frozen copy of it,
or `ref_model_name_or_path`; with LoRA (`use_peft: true`) it is the same weights with the adapter switched
off, so no second copy is held. The critic starts from `value_model_path`, by default the reward model
(`reward_model_path`) or else the policy's weights with a zero-initialised value head; it reads the
policy's token ids, so its tokenizer must be the policy's (checked). Policy and critic are trained as one
module with one optimizer, which is what lets DeepSpeed ZeRO-1/2 and DDP wrap them; ZeRO-3 and FSDP are
refused (generation there needs gathered weights).

Logged every `logging_steps` updates (run.log, and the tracker named in `report_to`): score, KL per
sequence, β, entropy, policy/value loss, clip fractions, approx-KL, explained variance, response length,
EOS rate. With `eval_data`, `num_eval_samples` responses per prompt are sampled before and after
training and `run.json` records their mean score (`eval_reward_before`, `eval_reward`) and KL to the
reference (`eval_kl`). Checkpoints (`save_strategy: steps`) hold the whole training state; rerunning with
the same `output_dir` resumes from the latest one (`resume_from_checkpoint: false` starts afresh).
Resuming unpickles nothing: weights are safetensors, the optimizer and RNG states are read with
`torch.load(weights_only=True)`, the scheduler and β from JSON. DeepSpeed's own checkpoint reader
unpickles, so a DeepSpeed resume needs `trust_checkpoint: true`.

Code: config, models, rollout, update, state; `main` (and the update loop, `train`) in stage.py.
"""

from pipeline.stages.ppo.config import PPOStageConfig
from pipeline.stages.ppo.models import PolicyAndValue, token_values
from pipeline.stages.ppo.rollout import encode_prompts, rollout, rollout_rows, score_responses
from pipeline.stages.ppo.stage import CONFIG_CLASSES, main

__all__ = ["CONFIG_CLASSES", "PPOStageConfig", "PolicyAndValue", "encode_prompts", "main", "rollout", "rollout_rows",
           "score_responses", "token_values"]  # fmt: skip
