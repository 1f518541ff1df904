"""`pipeline ppo`: check inputs → load models → resume → train (rollout, score, update) → save. The stage's
documentation is the package's (`pipeline.stages.ppo`)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from trl import ModelConfig

from pipeline import outputs
from pipeline.configs import DataArguments, parse_stage_args
from pipeline.data import load_train_eval
from pipeline.errors import PipelineError
from pipeline.losses import (
    KLController,
    explained_variance,
)
from pipeline.models import check_model_dir
from pipeline.rewards.online import RewardArguments, build_reward_funcs, prompt_dataset, reward_names
from pipeline.runinfo import RunInfo, setup_logging, setup_tracking
from pipeline.stages.ppo.config import STATE_FILE, PPOStageConfig
from pipeline.stages.ppo.models import PolicyAndValue, check_critic_tokenizer, load_models
from pipeline.stages.ppo.rollout import encode_prompts, evaluate, rollout, rollout_rows
from pipeline.stages.ppo.state import gather, latest_checkpoint, save_checkpoint, save_policy
from pipeline.stages.ppo.update import ppo_update
from pipeline.training import merge_saved_adapter, refuse_resuming_another_run

log = logging.getLogger("pipeline.ppo")

# the dataclasses a recipe of this stage fills (tests/test_configs.py parses every shipped recipe with them)
CONFIG_CLASSES = (DataArguments, RewardArguments, PPOStageConfig, ModelConfig)


def check_inputs(data_args, reward_args, args, model_args):
    """Every input checked before anything is written: (reward names, train prompts, eval prompts or None)."""
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
    return names, train_dataset, eval_dataset


def make_accelerator(args, trackers: list[str]):
    from accelerate import Accelerator, DistributedType

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
    return accelerator, plugin


def with_query_ids(dataset, tokenizer, max_prompt_length: int) -> list[dict]:
    """The prompt rows with their token ids; prompts longer than `max_prompt_length` are dropped (logged)."""
    rows = [dict(r) for r in dataset]
    for row, ids in zip(rows, encode_prompts(tokenizer, [r["prompt"] for r in rows]), strict=True):
        row["query_ids"] = ids
    kept = [r for r in rows if len(r["query_ids"]) <= max_prompt_length]
    if len(kept) < len(rows):
        log.warning(
            "dropped %d prompts longer than max_prompt_length=%d", len(rows) - len(kept), max_prompt_length
        )
    return kept


def world_and_rank(accelerator) -> tuple[int, int]:
    # accelerate reports one process for DeepSpeed on CPU ranks; torch.distributed knows the real world
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return accelerator.num_processes, accelerator.process_index


def build_optimizer(model, args, optimizer_steps: int):
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon, weight_decay=args.weight_decay,
    )  # fmt: skip
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, args.get_warmup_steps(optimizer_steps), optimizer_steps
    )
    return optimizer, scheduler


def resume_state(accelerator, plugin, args, scheduler, kl_ctl, updates: int) -> tuple[int, list[dict]]:
    """(update to start from, history so far): from the latest complete checkpoint, a named one, or none."""
    resume = args.resume_from_checkpoint
    checkpoint = None
    if resume is None or str(resume).lower() == "true":
        checkpoint = latest_checkpoint(args.output_dir)
    elif str(resume).lower() not in ("false", "none", ""):
        checkpoint = Path(resume)
        if not (checkpoint / STATE_FILE).is_file():
            raise PipelineError(f"resume_from_checkpoint: '{resume}' is not a complete PPO checkpoint")
    if checkpoint is None:
        return 0, []
    if plugin is not None and not args.trust_checkpoint:
        raise PipelineError(f"resuming from {checkpoint}: DeepSpeed reads its checkpoints by unpickling, which "
                            "runs any code the files hold; if this run wrote them, pass --trust_checkpoint true")  # fmt: skip
    accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
    state = json.loads((checkpoint / STATE_FILE).read_text())
    kl_ctl.value = state["kl_coef"]
    scheduler.load_state_dict(state["scheduler"])
    log.info("resumed from %s (update %d of %d)", checkpoint, state["update"], updates)
    return state["update"], state["history"]


def update_record(update: int, batch: dict, stats: dict, kl_ctl, scheduler) -> tuple[dict, int]:
    """The statistics of one update, averaged over processes, and the number of responses they cover."""
    mask = batch["mask"]
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
    return record, len(scores)


def train(ctx, prompts, history: list[dict], start_update: int, updates: int, rows_per_update: int) -> None:
    """The PPO updates from `start_update` on: rollout → score → update, logged and checkpointed."""
    from tqdm.auto import tqdm

    args, kl_ctl = ctx["args"], ctx["kl_ctl"]
    for update in tqdm(range(start_update, updates), desc="ppo updates", initial=start_update, total=updates,
                       disable=ctx["rank"] != 0):  # fmt: skip
        rows = rollout_rows(prompts, update, rows_per_update, ctx["rank"], ctx["world"], args.seed)
        batch = rollout(ctx["unwrapped"], ctx["reference"], ctx["tokenizer"], ctx["reward_funcs"],
                        ctx["reward_tokenizers"], rows, args, kl_ctl.value, ctx["device"])  # fmt: skip
        stats = ppo_update(ctx["model"], ctx["optimizer"], ctx["scheduler"], ctx["accelerator"], batch, args,
                           seed=args.seed * 100003 + update)  # fmt: skip
        record, responses = update_record(update, batch, stats, kl_ctl, ctx["scheduler"])
        history.append(record)
        kl_ctl.update(record["kl"], responses)
        ctx["accelerator"].log(record, step=update + 1)
        if (update + 1) % max(int(args.logging_steps), 1) == 0 or update + 1 == updates:
            log.info(
                "update %d: %s",
                update + 1,
                ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "update"),
            )
        if args.save_strategy == "steps" and args.save_steps and (update + 1) % int(args.save_steps) == 0:
            save_checkpoint(ctx["accelerator"], args.output_dir, update + 1, {"kl_coef": kl_ctl.value, "history": history,
                            "scheduler": ctx["scheduler"].state_dict()}, args.save_total_limit, ctx["rank"] == 0)  # fmt: skip


def _set_deepspeed_batch(plugin, args: PPOStageConfig, world: int) -> None:
    """No dataloader goes through accelerate's prepare(), so DeepSpeed's "auto" batch sizes are set here."""
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    plugin.deepspeed_config["train_batch_size"] = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    )


def _train_between_evals(ctx: dict, prompts: list, eval_args: tuple, history: list, start_update: int,
                         updates: int, rows_per_update: int, metrics: dict) -> None:  # fmt: skip
    """Evaluate (unless resuming), train, evaluate again; the scores go into `metrics`."""
    eval_prompts = eval_args[5]
    if eval_prompts and start_update == 0:
        before = evaluate(*eval_args)
        metrics.update(eval_reward_before=before["reward"], eval_kl_before=before["kl"])
        log.info("eval before training: mean score %.4f, KL %.4f", before["reward"], before["kl"])
    train(ctx, prompts, history, start_update, updates, rows_per_update)
    if history:
        metrics.update(
            score_start=history[0]["score"], score_end=history[-1]["score"], kl_end=history[-1]["kl"]
        )
    if eval_prompts:
        after = evaluate(*eval_args)
        metrics.update(eval_reward=after["reward"], eval_kl=after["kl"])
        log.info("eval after training: mean score %.4f, KL %.4f", after["reward"], after["kl"])


def main(argv: list[str] | None = None) -> dict:
    data_args, reward_args, args, model_args = parse_stage_args(CONFIG_CLASSES, argv, "ppo")
    from accelerate.utils import set_seed

    names, train_dataset, eval_dataset = check_inputs(data_args, reward_args, args, model_args)
    trackers = [t for t in args.report_to or [] if t not in ("none", "")]
    accelerator, plugin = make_accelerator(args, trackers)
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

    prompts = with_query_ids(train_dataset, tokenizer, args.max_prompt_length)
    eval_prompts = (
        with_query_ids(eval_dataset, tokenizer, args.max_prompt_length) if eval_dataset is not None else []
    )
    if not prompts:
        raise PipelineError(f"train_data: no prompt fits max_prompt_length={args.max_prompt_length}")
    rows_per_update = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.num_mini_batches
    )
    world, rank = world_and_rank(accelerator)
    updates = args.max_steps if args.max_steps > 0 else math.ceil(
        args.num_train_epochs * len(prompts) / (rows_per_update * world))  # fmt: skip
    model = PolicyAndValue(policy, critic)
    optimizer, scheduler = build_optimizer(model, args, updates * args.num_ppo_epochs * args.num_mini_batches)
    if plugin is not None:
        _set_deepspeed_batch(plugin, args, world)
    model, optimizer = accelerator.prepare(model, optimizer)
    kl_ctl = KLController(args.kl_coef, args.kl_target, args.kl_horizon)
    start_update, history = resume_state(accelerator, plugin, args, scheduler, kl_ctl, updates)

    log.info("ppo: output_dir=%s log=%s; %d train prompts, %d eval prompts, rewards %s; %d updates of %d prompts"
             " x %d processes", args.output_dir, log_path, len(prompts), len(eval_prompts), ", ".join(names),
             updates, rows_per_update, world)  # fmt: skip
    if trackers:
        flat = {k: v for k, v in run.data["config"].items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("pipeline-ppo", config=flat)
    unwrapped = accelerator.unwrap_model(model)
    ctx = dict(args=args, kl_ctl=kl_ctl, rank=rank, world=world, unwrapped=unwrapped, reference=reference,
               tokenizer=tokenizer, reward_funcs=reward_funcs, reward_tokenizers=reward_tokenizers, device=device,
               model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator)  # fmt: skip
    metrics: dict = {"train_prompts": len(prompts), "eval_prompts": len(eval_prompts), "updates": updates}
    eval_args = (unwrapped, reference, tokenizer, reward_funcs, reward_tokenizers, eval_prompts, args, device)
    try:
        _train_between_evals(
            ctx, prompts, eval_args, history, start_update, updates, rows_per_update, metrics
        )
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
