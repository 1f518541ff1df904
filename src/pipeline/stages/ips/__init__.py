"""IPS stage: offline importance-sampling training from reward-keyed responses and stored reference logps.

    pipeline ips --config recipes/demo/ips.yaml [--loss_type topr --kl_coef 0.1 ...]
    scripts/train.sh DATAPATH MODELPATH TAG REWARDKEY RSPKEY DATAFILTER      # accelerate + DeepSpeed

Inputs: a `pipeline prepare` output (`data_path`, its `rl/` view) and the `pipeline logp` output for it
(`logp_dir`, default `{data_path}_{ref_tag}_logp`). Before any step the logp manifest must agree with this
run: same tokenizer, same `max_length`, same reference model (`ref_model_name_or_path`, default the model
being trained) and the same response column — else a one-line error. Rows without logps are an error that
says how many (or are skipped with `skip_missing: true`, counted and logged). No silent row limits.

Each row is tokenized by `tokenize_prompt_response`, the function the logp stage used, and its response
token count is checked against the stored logps. The loss (`pipeline.losses`, formula in its docstring and
the README) is computed on the policy's log-probs of response tokens (hidden states → lm_head in
checkpointed chunks, so no `[batch, seq, vocab]` tensor is kept for backward).

Fields: every `SFTConfig` field (optimizer, schedule, DeepSpeed, LoRA via `use_peft`...), `ModelConfig`, and
the IPS fields below. Metrics: policy loss split by reward sign, KL, ρ mean/max, clipped fraction, reward
mean, response tokens/s.
"""

from pipeline.stages.ips.config import IPSConfig
from pipeline.stages.ips.dataset import IPSCollator, build_dataset
from pipeline.stages.ips.stage import CONFIG_CLASSES, main
from pipeline.stages.ips.trainer import IPSTrainer

__all__ = ["CONFIG_CLASSES", "IPSCollator", "IPSConfig", "IPSTrainer", "build_dataset", "main"]
