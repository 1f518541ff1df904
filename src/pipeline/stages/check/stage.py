"""`pipeline check`: parse → read the model shape → plan → estimate → probe (GPU) → recommend → render.
The stage's documentation is the package's (`pipeline.stages.check`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.stages.check.memory import alternatives, budget_bytes, estimate, recommend
from pipeline.stages.check.plan import STAGES, Plan, as_bool, build_plan, load_recipe, visible_gpus
from pipeline.stages.check.probe import run_probe
from pipeline.stages.check.render import gib, render
from pipeline.stages.check.shape import GiB, ModelShape, read_model_shape

# ------------------------------------------------------------------------------------ model shape, counts


# ------------------------------------------------------------------------------------ LoRA


# ------------------------------------------------------------------------------------ the plan


# ------------------------------------------------------------------------------------ the estimate


# ------------------------------------------------------------------------------------ recipe → plan


# ------------------------------------------------------------------------------------ probe (GPU)


# ------------------------------------------------------------------------------------ recommendation


# ------------------------------------------------------------------------------------ main


def _stage_doc() -> str:
    """The stage's documentation: the package's docstring (--help shows it)."""
    import importlib

    return importlib.import_module("pipeline.stages.check").__doc__ or ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline check", description=_stage_doc().split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a stage's YAML recipe")
    parser.add_argument("--stage", choices=STAGES, help="the recipe's stage (default: file name, then keys)")
    parser.add_argument("--model_name_or_path", help="override the recipe's model folder")
    parser.add_argument("--num_gpus", type=int, help="processes in total (default: GPUs visible, else 1)")
    parser.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    parser.add_argument("--offload", action="store_true", help="ZeRO-Offload / FSDP CPU offload")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2, full shard")
    parser.add_argument(
        "--accelerate_config", help="read engine, ZeRO stage, offload, processes from this YAML"
    )
    parser.add_argument("--per_device_train_batch_size", type=int, help="override the recipe's micro-batch")
    parser.add_argument("--gradient_accumulation_steps", type=int, help="override the recipe's")
    parser.add_argument(
        "--max_length", type=int, help="override the length (completion length for grpo/rloo/ppo)"
    )
    parser.add_argument("--prompt_length", type=int, help="prompt tokens for grpo/rloo/ppo")
    parser.add_argument("--gradient_checkpointing", type=lambda s: as_bool("--gradient_checkpointing", s))
    parser.add_argument(
        "--gpu_memory_gib", type=float, help="compare with a GPU of this size (e.g. on a CPU machine)"
    )
    parser.add_argument("--probe", type=lambda s: as_bool("--probe", s), default=True,
                        help="on a GPU, run one probe step (default true)")  # fmt: skip
    parser.add_argument("--output_json", help="also write the result here")
    return parser


def probe_step(args, gpus, shape, plan) -> tuple[dict | None, int]:
    """On a GPU: one probe step of the real model (one process, no sharding, the policy alone), and how far
    its peak is above the estimate (the offset later recommendations add); (None, 0) without one."""
    if not (gpus and args.probe):
        return None, 0
    single = replace(plan, num_gpus=1, engine="single", zero=None, offload=False, policy_only=True, notes=[])
    single_est = estimate(shape, single)
    if single_est.persistent_bytes > gpus[0]["total_bytes"]:
        return {"skipped": f"unsharded, the weights, gradients and optimizer alone take "
                           f"{gib(single_est.persistent_bytes)} GiB, more than GPU 0 has"}, 0  # fmt: skip
    probe = run_probe(shape.path, shape, plan, "cuda:0")
    probe["estimate_single_gpu_bytes"] = single_est.total
    offset = 0 if probe["out_of_memory"] else probe["peak_allocated_bytes"] - single_est.total
    return probe, offset


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)

    recipe = load_recipe(args.config)
    model_path = args.model_name_or_path or recipe.get("model_name_or_path")
    if not model_path:
        raise PipelineError(f"{args.config}: no model_name_or_path (a local model folder)")
    shape = read_model_shape(str(model_path))
    gpus = visible_gpus()
    plan, how = build_plan(args, recipe, gpus, shape.dtype)
    critic = reward = None
    if plan.stage == "ppo":
        source = plan.value_model_path or plan.reward_model_path
        critic = _optional_shape(source, "value_model_path", plan) if source else None
    if plan.reward_model and plan.reward_model_path:
        reward = _optional_shape(plan.reward_model_path, "reward_model_path", plan)
    est = estimate(shape, plan, critic, reward)
    plan.notes += est.notes

    gpu_rows = []
    targets = [dict(g) for g in gpus]
    if args.gpu_memory_gib:
        targets = [{"index": None, "name": f"--gpu_memory_gib {args.gpu_memory_gib:g}",
                    "total_bytes": int(args.gpu_memory_gib * GiB)}]  # fmt: skip
    for g in targets:
        budget = budget_bytes(g["total_bytes"])
        gpu_rows.append({**g, "budget_bytes": budget, "fits": est.total <= budget})
    probe, offset = probe_step(args, gpus, shape, plan)
    recommendation = None
    options: list[str] = []
    if gpu_rows:
        budget = min(r["budget_bytes"] for r in gpu_rows)
        recommendation = recommend(shape, plan, budget, critic, reward, offset)
        if recommendation is None:
            options = alternatives(shape, plan, budget, critic, reward)

    result = {
        "recipe": args.config,
        "stage": plan.stage,
        "stage_from": how,
        "model": asdict(shape),
        "params": est.params,
        "plan": {k: v for k, v in asdict(plan).items() if k != "notes"},
        "global_batch": plan.global_batch,
        "memory_per_device": {i.name: i.bytes for i in est.items},
        "formulas": {i.name: i.formula for i in est.items},
        "persistent_bytes": est.persistent_bytes,
        "step_bytes": est.step_bytes,
        "generation_bytes": est.generation_bytes,
        "total_bytes": est.total,
        "host_memory_per_process": {i.name: i.bytes for i in est.host_items},
        "host_total_bytes": est.host_bytes,
        "gpus": gpu_rows,
        "gpu_visible": bool(gpus),
        "probe": probe,
        "recommendation": recommendation,
        "alternatives": options,
        "notes": plan.notes,
    }
    print(render(result, shape, plan, est))
    if args.output_json:
        out = Path(args.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _optional_shape(path: str, key: str, plan: Plan) -> ModelShape | None:
    """Shape of a critic / reward model folder; the policy's shape (with a note) when it is not local."""
    try:
        return read_model_shape(path, key)
    except PipelineError as err:
        plan.notes.append(f"{err}: sized like the policy")
        return None
