"""One PPO update: epochs of mini-batches over a rollout, with the clipped policy and value losses."""

from __future__ import annotations

import logging

import torch

from pipeline.losses import (
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
)
from pipeline.stages.ppo.config import PPOStageConfig
from pipeline.stages.ppo.rollout import response_logps

log = logging.getLogger("pipeline.ppo")


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
