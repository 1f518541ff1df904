"""PPO stage (our own: TRL 1.16 has no PPOTrainer): policy, frozen reference, reward, and a critic.

    pipeline ppo --config recipes/demo/ppo.yaml [--max_steps 20 --kl_coef 0.05 ...]
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml -m pipeline.cli ppo --config ...

One PPO *update* (what `max_steps` counts) reads top to bottom in `main()`:

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
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import TrainingArguments
from trl import ModelConfig

from pipeline import outputs
from pipeline.configs import DataArguments, parse_stage_args
from pipeline.data import load_train_eval
from pipeline.errors import PipelineError
from pipeline.losses import (
    KL_ESTIMATORS,
    KLController,
    explained_variance,
    gae_advantages,
    masked_mean,
    masked_whiten,
    policy_kl_per_token,
    ppo_policy_loss,
    ppo_value_loss,
)
from pipeline.models import check_model_dir
from pipeline.rewards.online import RewardArguments, build_reward_funcs, prompt_dataset, reward_names
from pipeline.runinfo import RunInfo, setup_logging, setup_tracking
from pipeline.tokenization import PromptError, reward_model_input_ids
from pipeline.training import final_tmp, merge_saved_adapter, refuse_resuming_another_run, swap_in_final_model

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


# ------------------------------------------------------------------------------------------------ models


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


# ------------------------------------------------------------------------------------------------ rollout


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Prompt token ids: a chat through the chat template with the assistant turn opened; text as is."""
    ids = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids.append(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            ids.append(list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"]))  # fmt: skip
    return ids


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_responses(policy, tokenizer, query_ids, query_mask, args: PPOStageConfig):
    """Sampled responses [B, R] and their mask: 1 up to and including the first EOS, pad after it."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0, max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    was_training = policy.training
    policy.eval()
    output = policy.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config)
    policy.train(was_training)
    responses = output[:, query_ids.shape[1] :]
    is_eos = responses == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = (~after_eos).long()
    return responses.masked_fill(after_eos, tokenizer.pad_token_id), mask


def sequence_inputs(query_ids, query_mask, responses, response_mask):
    input_ids = torch.cat([query_ids, responses], 1)
    attention_mask = torch.cat([query_mask, response_mask], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def response_logps(logits, responses, query_width: int, temperature: float):
    """log π(y_t) of each response token: logits at the position before it, at the sampling temperature."""
    from trl.trainer.utils import selective_log_softmax

    logits = logits[:, query_width - 1 : -1].float() / temperature
    return selective_log_softmax(logits, responses), logits


@torch.no_grad()
def score_responses(
    reward_funcs, reward_tokenizers, rows: list[dict], texts: list[str], device
) -> torch.Tensor:
    """Sum over the reward functions of each response's score (re-tokenized for a reward model)."""
    total = torch.zeros(len(texts), device=device)
    for func, rm_tokenizer in zip(reward_funcs, reward_tokenizers, strict=True):
        if rm_tokenizer is not None:  # a reward model, scored on its own tokenization of the text
            try:
                ids = [
                    reward_model_input_ids(rm_tokenizer, r["prompt"], t)
                    for r, t in zip(rows, texts, strict=True)
                ]
            except PromptError as err:
                raise PipelineError(f"reward_model_path: {err}") from None
            batch = rm_tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding_side="right").to(device)
            scores = func(**batch).logits[:, 0].float()
        else:
            columns = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "query_ids")}
            values = func(prompts=[r["prompt"] for r in rows], completions=texts, **columns)
            scores = torch.tensor([0.0 if v is None else v for v in values], device=device)
        total += scores
    return total


@torch.no_grad()
def rollout(model, reference, tokenizer, reward_funcs, reward_tokenizers, rows, args, kl_coef: float, device):
    """Sample, score and compute advantages for one batch of prompt rows. Returns a dict of [B, R] tensors
    (and [B] scores) plus the decoded texts."""
    unwrapped = model
    query_ids, query_mask = left_pad([r["query_ids"] for r in rows], tokenizer.pad_token_id, device)
    responses, mask = sample_responses(unwrapped.policy, tokenizer, query_ids, query_mask, args)
    inputs = sequence_inputs(query_ids, query_mask, responses, mask)
    width = query_ids.shape[1]
    logps, values, ref_logps = [], [], []
    for start in range(0, len(rows), args.per_device_train_batch_size):
        part = slice(start, start + args.per_device_train_batch_size)
        chunk = [t[part] for t in inputs]
        logits, value = unwrapped(*chunk)
        logps.append(response_logps(logits, responses[part], width, args.temperature)[0])
        values.append(value[:, width - 1 : -1])
        if reference is None:  # LoRA: the reference is the base, adapter off
            with unwrapped.policy.disable_adapter():
                ref_logits = unwrapped.policy(input_ids=chunk[0], attention_mask=chunk[1], position_ids=chunk[2],
                                              use_cache=False).logits  # fmt: skip
        else:
            ref_logits = reference(input_ids=chunk[0], attention_mask=chunk[1], position_ids=chunk[2],
                                   use_cache=False).logits  # fmt: skip
        ref_logps.append(response_logps(ref_logits, responses[part], width, args.temperature)[0])
    logps, values, ref_logps = torch.cat(logps), torch.cat(values), torch.cat(ref_logps)

    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    scores = score_responses(reward_funcs, reward_tokenizers, rows, texts, device)
    has_eos = (responses == tokenizer.eos_token_id).any(1)
    if args.missing_eos_penalty is not None:
        scores = torch.where(has_eos, scores, scores - args.missing_eos_penalty)
    if args.score_clip is not None:
        scores = scores.clamp(-args.score_clip, args.score_clip)

    kl = policy_kl_per_token(logps, ref_logps, args.kl_estimator) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1) - 1
    rewards[torch.arange(len(rows), device=device), last] += scores
    if args.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae_advantages(rewards, values, mask, args.gamma, args.lam)
    advantages = masked_whiten(advantages, mask)
    return {
        "inputs": inputs, "responses": responses, "mask": mask, "logps": logps, "values": values,
        "advantages": advantages, "returns": returns, "scores": scores, "kl": kl.sum(1), "has_eos": has_eos,
        "width": width, "texts": texts,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ helpers


def rollout_rows(
    dataset_rows: list[dict], update: int, rows_per_update: int, rank: int, world: int, seed: int
):
    """This process's prompt rows for one update: a seeded shuffle per pass over the data, consumed in order,
    so update u always sees the same prompts (which is what makes a resumed run repeat the original)."""
    n = len(dataset_rows)
    start = (update * rows_per_update * world) + rank * rows_per_update
    picked = []
    for position in range(start, start + rows_per_update):
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        picked.append(dataset_rows[int(order[offset])])
    return picked


# accelerate reports a single process for DeepSpeed on CPU ranks, so cross-process steps go through
# torch.distributed directly whenever it is initialised (the same calls are right on GPUs).


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a same-shaped tensor from every process."""
    if not _distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def own_checkpoints(output_dir: str) -> list[tuple[int, Path]]:
    """The complete checkpoints this stage wrote (a `checkpoint-N` without its state file is not touched)."""
    return sorted((int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
                  if (m := CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file())  # fmt: skip


def latest_checkpoint(output_dir: str) -> Path | None:
    found = own_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    accelerator, output_dir: str, update: int, state: dict, limit: int | None, main: bool
) -> None:
    """The whole training state (models, optimizer, scheduler, RNGs, β, history), complete or absent."""
    final = Path(output_dir) / f"checkpoint-{update}"
    tmp = Path(output_dir) / f".checkpoint-{update}.tmp"
    if main and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    accelerator.save_state(str(tmp))
    barrier()
    if main:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "update": update}))
        if final.exists():
            if not (final / STATE_FILE).is_file():
                raise PipelineError(f"{final} was not written by this stage and this run would save over it; "
                                    "move it out of output_dir and resume")  # fmt: skip
            shutil.rmtree(final)
        os.replace(tmp, final)
        if limit:
            for _, path in own_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(path, ignore_errors=True)
    barrier()


@torch.no_grad()
def evaluate(model, reference, tokenizer, reward_funcs, reward_tokenizers, eval_rows, args, device) -> dict:
    """Mean score and KL to the reference (per sequence) of `num_eval_samples` sampled responses per prompt."""
    rows = [r for r in eval_rows for _ in range(args.num_eval_samples)]
    scores, kls = [], []
    batch = args.per_device_eval_batch_size
    for start in range(0, len(rows), batch):
        out = rollout(model, reference, tokenizer, reward_funcs, reward_tokenizers, rows[start : start + batch],
                      args, 0.0, device)  # fmt: skip
        scores.append(out["scores"])
        kls.append(out["kl"])
    return {"reward": torch.cat(scores).mean().item(), "kl": torch.cat(kls).mean().item()}


def ppo_update(
    model, optimizer, scheduler, accelerator, batch: dict, args: PPOStageConfig, seed: int
) -> dict:
    """`num_ppo_epochs` passes over one rollout batch, each in `num_mini_batches` shuffled mini-batches of
    `gradient_accumulation_steps` micro-batches; one optimizer step per mini-batch. Returns mean statistics."""
    from trl.trainer.utils import entropy_from_logits

    mask, width, size = batch["mask"], batch["width"], len(batch["mask"])
    generator = torch.Generator().manual_seed(seed)
    mini = size // args.num_mini_batches
    stats: dict[str, list] = {}
    for _ in range(args.num_ppo_epochs):
        order = torch.randperm(size, generator=generator).to(mask.device)
        for start in range(0, mini * args.num_mini_batches, args.per_device_train_batch_size):
            idx = order[start : start + args.per_device_train_batch_size]
            part = mask[idx]
            with accelerator.accumulate(model):
                logits, values = model(*(t[idx] for t in batch["inputs"]))
                logps, logits = response_logps(logits, batch["responses"][idx], width, args.temperature)
                values = values[:, width - 1 : -1]
                pg_loss, pg_stats = ppo_policy_loss(
                    logps, batch["logps"][idx], batch["advantages"][idx], part, args.cliprange
                )
                vf_loss, vf_stats = ppo_value_loss(
                    values, batch["values"][idx], batch["returns"][idx], part, args.cliprange_value
                )
                with torch.set_grad_enabled(args.ent_coef != 0):  # a full-vocabulary pass: graph only if used
                    entropy = masked_mean(entropy_from_logits(logits), part)
                loss = pg_loss + args.vf_coef * vf_loss - args.ent_coef * entropy
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            step_stats = {
                "loss/policy": pg_loss,
                "loss/value": vf_loss,
                "entropy": entropy,
                **pg_stats,
                **vf_stats,
            }
            for key, value in step_stats.items():
                stats.setdefault(key, []).append(value.detach())
    return {key: torch.stack(values).mean() for key, values in stats.items()}


# ------------------------------------------------------------------------------------------------ stage


# the dataclasses a recipe of this stage fills (tests/test_configs.py parses every shipped recipe with them)
CONFIG_CLASSES = (DataArguments, RewardArguments, PPOStageConfig, ModelConfig)


def main(argv: list[str] | None = None) -> dict:
    data_args, reward_args, args, model_args = parse_stage_args(CONFIG_CLASSES, argv, "ppo")
    from accelerate import Accelerator, DistributedType
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    # every input is checked before anything is written
    names = reward_names(reward_args)
    check_model_dir(model_args.model_name_or_path)
    if args.ref_model_name_or_path:
        check_model_dir(args.ref_model_name_or_path, "ref_model_name_or_path")
    if args.value_model_path:
        check_model_dir(args.value_model_path, "value_model_path")
    check_critic_tokenizer(args, reward_args, model_args.model_name_or_path)
    train_rows, eval_rows = load_train_eval(data_args, args.seed)
    train_dataset = prompt_dataset(train_rows, "train_data", names, reward_args)
    eval_dataset = prompt_dataset(eval_rows, "eval_data", names, reward_args) if eval_rows else None

    trackers = [t for t in args.report_to or [] if t not in ("none", "")]
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=args.use_cpu,
                              mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "no",
                              log_with=trackers or None, project_dir=args.output_dir)  # fmt: skip
    plugin = accelerator.state.deepspeed_plugin
    if (
        plugin is not None and plugin.zero_stage == 3
    ) or accelerator.distributed_type == DistributedType.FSDP:
        raise PipelineError(
            "ppo: ZeRO-3 and FSDP are not supported (generation needs whole weights); use ZeRO-2"
        )
    configs = (data_args, reward_args, args, model_args)
    outputs.claim(args.output_dir, "ppo")
    refuse_resuming_another_run(args.output_dir, "ppo", configs, args.resume_from_checkpoint)
    log_path = setup_logging(args.output_dir)
    setup_tracking(args.report_to, args.output_dir)
    run = RunInfo(args.output_dir, "ppo", configs, args.seed)
    set_seed(args.seed)
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else None
    tokenizer, policy, reference, critic = load_models(args, model_args, reward_args, dtype)
    reward_funcs, reward_tokenizers = build_reward_funcs(names, reward_args, dtype)
    device = accelerator.device
    reward_funcs = [f.to(device) if isinstance(f, torch.nn.Module) else f for f in reward_funcs]
    if reference is not None:
        reference.to(device)

    def with_query_ids(dataset) -> list[dict]:
        rows = [dict(r) for r in dataset]
        for row, ids in zip(rows, encode_prompts(tokenizer, [r["prompt"] for r in rows]), strict=True):
            row["query_ids"] = ids
        kept = [r for r in rows if len(r["query_ids"]) <= args.max_prompt_length]
        if len(kept) < len(rows):
            log.warning("dropped %d prompts longer than max_prompt_length=%d", len(rows) - len(kept),
                        args.max_prompt_length)  # fmt: skip
        return kept

    prompts = with_query_ids(train_dataset)
    eval_prompts = with_query_ids(eval_dataset) if eval_dataset is not None else []
    if not prompts:
        raise PipelineError(f"train_data: no prompt fits max_prompt_length={args.max_prompt_length}")
    rows_per_update = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.num_mini_batches
    )
    # accelerate reports one process for DeepSpeed on CPU ranks; torch.distributed knows the real world
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else accelerator.num_processes
    rank = torch.distributed.get_rank() if distributed else accelerator.process_index
    updates = args.max_steps if args.max_steps > 0 else math.ceil(
        args.num_train_epochs * len(prompts) / (rows_per_update * world))  # fmt: skip
    optimizer_steps = updates * args.num_ppo_epochs * args.num_mini_batches

    model = PolicyAndValue(policy, critic)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon, weight_decay=args.weight_decay,
    )  # fmt: skip
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, args.get_warmup_steps(optimizer_steps), optimizer_steps
    )
    if (
        plugin is not None
    ):  # no dataloader goes through prepare(), so DeepSpeed's "auto" batch size is set here
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
        plugin.deepspeed_config["train_batch_size"] = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * world
        )
    model, optimizer = accelerator.prepare(model, optimizer)
    kl_ctl = KLController(args.kl_coef, args.kl_target, args.kl_horizon)
    history: list[dict] = []
    start_update = 0
    resume = args.resume_from_checkpoint
    checkpoint = None
    if resume is None or str(resume).lower() == "true":
        checkpoint = latest_checkpoint(args.output_dir)
    elif str(resume).lower() not in ("false", "none", ""):
        checkpoint = Path(resume)
        if not (checkpoint / STATE_FILE).is_file():
            raise PipelineError(f"resume_from_checkpoint: '{resume}' is not a complete PPO checkpoint")
    if checkpoint is not None:
        if plugin is not None and not args.trust_checkpoint:
            raise PipelineError(f"resuming from {checkpoint}: DeepSpeed reads its checkpoints by unpickling, which "
                                "runs any code the files hold; if this run wrote them, pass --trust_checkpoint "
                                "true")  # fmt: skip
        accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
        state = json.loads((checkpoint / STATE_FILE).read_text())
        start_update, kl_ctl.value, history = state["update"], state["kl_coef"], state["history"]
        scheduler.load_state_dict(state["scheduler"])
        log.info("resumed from %s (update %d of %d)", checkpoint, start_update, updates)

    log.info("ppo: output_dir=%s log=%s; %d train prompts, %d eval prompts, rewards %s; %d updates of %d prompts"
             " x %d processes", args.output_dir, log_path, len(prompts), len(eval_prompts), ", ".join(names),
             updates, rows_per_update, world)  # fmt: skip
    if trackers:
        flat = {k: v for k, v in run.data["config"].items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("pipeline-ppo", config=flat)
    unwrapped = accelerator.unwrap_model(model)
    metrics: dict = {"train_prompts": len(prompts), "eval_prompts": len(eval_prompts), "updates": updates}
    eval_args = (unwrapped, reference, tokenizer, reward_funcs, reward_tokenizers, eval_prompts, args, device)
    try:
        if eval_prompts and start_update == 0:
            before = evaluate(*eval_args)
            metrics.update(eval_reward_before=before["reward"], eval_kl_before=before["kl"])
            log.info("eval before training: mean score %.4f, KL %.4f", before["reward"], before["kl"])
        for update in tqdm(range(start_update, updates), desc="ppo updates", initial=start_update, total=updates,
                           disable=rank != 0):  # fmt: skip
            rows = rollout_rows(prompts, update, rows_per_update, rank, world, args.seed)
            batch = rollout(unwrapped, reference, tokenizer, reward_funcs, reward_tokenizers, rows, args,
                            kl_ctl.value, device)  # fmt: skip
            stats = ppo_update(
                model, optimizer, scheduler, accelerator, batch, args, seed=args.seed * 100003 + update
            )
            mask = batch["mask"]
            # statistics of this update, averaged over processes
            scores, kl = gather(batch["scores"]), gather(batch["kl"])
            record = {
                "update": update + 1,
                "score": scores.mean().item(),
                "kl": kl.mean().item(),
                "kl_coef": kl_ctl.value,
                "non_score_reward": (-kl_ctl.value * kl).mean().item(),
                "response_length": gather(mask.sum(1).float()).mean().item(),
                "eos_rate": gather(batch["has_eos"].float()).mean().item(),
                "explained_variance": explained_variance(batch["values"], batch["returns"], mask).item(),
                "lr": scheduler.get_last_lr()[0],
                **{k: gather(v[None]).mean().item() for k, v in stats.items()},
            }
            history.append(record)
            kl_ctl.update(record["kl"], len(scores))
            accelerator.log(record, step=update + 1)
            if (update + 1) % max(int(args.logging_steps), 1) == 0 or update + 1 == updates:
                log.info(
                    "update %d: %s",
                    update + 1,
                    ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "update"),
                )
            if args.save_strategy == "steps" and args.save_steps and (update + 1) % int(args.save_steps) == 0:
                save_checkpoint(accelerator, args.output_dir, update + 1, {"kl_coef": kl_ctl.value, "history": history,
                                "scheduler": scheduler.state_dict()}, args.save_total_limit, rank == 0)  # fmt: skip
        if history:
            metrics.update(
                score_start=history[0]["score"], score_end=history[-1]["score"], kl_end=history[-1]["kl"]
            )
        if eval_prompts:
            after = evaluate(*eval_args)
            metrics.update(eval_reward=after["reward"], eval_kl=after["kl"])
            log.info("eval after training: mean score %.4f, KL %.4f", after["reward"], after["kl"])
        save_policy(accelerator, model, tokenizer, args.output_dir, rank == 0)
        if data_args.merge_lora and rank == 0 and not merge_saved_adapter(args.output_dir):
            log.warning("merge_lora: no LoRA adapter to merge (use_peft is off)")
    except BaseException:
        run.finish(metrics, status="failed")
        raise
    run.data["log_history"] = history
    run.finish(metrics)
    accelerator.end_training()
    log.info("policy saved to %s", args.output_dir)
    return {**metrics, "log_history": history}


def save_policy(accelerator, model, tokenizer, output_dir: str, main: bool) -> None:
    """The policy (or its LoRA adapter) and tokenizer as a plain HF folder, written aside and moved in."""
    state = accelerator.get_state_dict(model)
    if main:
        tmp = final_tmp(output_dir)
        policy = accelerator.unwrap_model(model).policy
        policy_state = {k[len("policy.") :]: v for k, v in state.items() if k.startswith("policy.")}
        policy.save_pretrained(tmp, state_dict=policy_state)
        tokenizer.padding_side = "right"  # what training stages expect when they load it
        tokenizer.save_pretrained(tmp)
        swap_in_final_model(tmp, output_dir)
    barrier()
