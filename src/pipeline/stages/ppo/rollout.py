"""Rollouts: sample responses, score them (rewards, reference and old log-probs, values), and the prompts of each update."""

from __future__ import annotations

import logging

import torch

from pipeline.errors import PipelineError
from pipeline.losses import (
    gae_advantages,
    masked_whiten,
    policy_kl_per_token,
)
from pipeline.stages.ppo.config import PPOStageConfig
from pipeline.tokenization import PromptError, reward_model_input_ids

log = logging.getLogger("pipeline.ppo")


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
