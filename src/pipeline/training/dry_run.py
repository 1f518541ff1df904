"""Dry runs: a cluster recipe turned into 2 CPU steps of a tiny random model, in its own folder."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger("pipeline.training")


DRY_RUN_STEPS = 2


DRY_RUN_ROWS = 16


DRY_RUN_EVAL_ROWS = 4


DRY_RUN_NEW_TOKENS = 32  # generation length cap (GRPO/RLOO completions, PPO responses)


DRY_RUN_MODEL = "dry_run_model"


DRY_RUN_REWARD_MODEL = "dry_run_reward_model"


# optimizers that run on any CPU; others (bitsandbytes, apex, paged...) are replaced in a dry run
CPU_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")


def dry_run_output_dir(output_dir: str) -> str:
    """`dry_runs/<output_dir without its root>` under the working directory: writable on a laptop, apart from
    the real run's folder (whose checkpoints a dry run must not touch)."""
    parts = [p for p in Path(output_dir).parts if p not in (os.sep, "..", ".") and not p.endswith(":\\")]
    return str(Path("dry_runs", *parts))


_built_tiny: list[Path] = []  # the first tiny model this process built: later dry runs copy it


def build_dry_run_models(output_dir: str, reward: bool) -> tuple[str, str | None]:
    """The tiny causal LM (and a tiny scalar reward model on the same tokenizer), built once per folder."""
    from pipeline import outputs
    from pipeline.tiny import make_tiny_model

    model_dir = Path(output_dir) / DRY_RUN_MODEL
    if not (model_dir / "config.json").is_file():
        source = next((p for p in _built_tiny if (p / "config.json").is_file()), None)
        if source is not None:  # training the tokenizer takes seconds; the files are the same
            with outputs.replacing(model_dir, "tiny-model") as tmp:
                shutil.copytree(source, tmp, dirs_exist_ok=True)
        else:
            make_tiny_model(model_dir, seed=0)
            _built_tiny.append(model_dir)
    if not reward:
        return str(model_dir), None
    reward_dir = Path(output_dir) / DRY_RUN_REWARD_MODEL
    if not (reward_dir / "config.json").is_file():
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        with outputs.replacing(reward_dir, "tiny-model") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return str(model_dir), str(reward_dir)


def _flag_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


# what a laptop has: one process, fp32 on the CPU, no DeepSpeed, quantization kernels, vLLM or tracker
DRY_RUN_HARDWARE = {"bf16": False, "fp16": False, "tf32": False, "use_cpu": True, "deepspeed": "",
                    "load_in_4bit": False, "load_in_8bit": False, "use_vllm": False, "use_liger_kernel": False,
                    "torch_compile": False, "report_to": "none", "push_to_hub": False, "dtype": "float32"}  # fmt: skip


def _as_flags(values: dict[str, Any], keys: set[str]) -> list[str]:
    return [item for key, value in values.items() if key in keys for item in (f"--{key}", _flag_value(value))]


def dry_run_hardware_flags(keys: set[str]) -> list[str]:
    """Flags appended before the recipe is first parsed: a cluster recipe's bf16 or vLLM settings would be
    refused on a laptop before the dry run could replace them."""
    return _as_flags(DRY_RUN_HARDWARE, keys)


def dry_run_flags(parsed: tuple, keys: set[str], stage: str) -> list[str]:
    """Command-line flags that turn a parsed recipe into its dry run (appended, so they win), after
    `dry_run_hardware_flags`: the tiny models, output folder, step/row/length caps and CPU-safe options.
    The output folder is always `dry_run_output_dir(output_dir)`, whether output_dir came from the recipe or
    the command line: a dry run never writes into a real run."""
    from pipeline import outputs

    values: dict[str, Any] = {}
    for config in parsed:
        for key, value in vars(config).items():
            values.setdefault(key, value)
    output_dir = dry_run_output_dir(values.get("output_dir") or "trainer_output")
    outputs.claim(output_dir, stage)
    needs_reward = any(values.get(k) for k in ("reward_model_path", "value_model_path"))
    model_dir, reward_dir = build_dry_run_models(output_dir, needs_reward)

    # a fresh start every time; 16 rows need no loader processes; one PPO epoch shows every code path
    flags: dict[str, Any] = {"output_dir": output_dir, "model_name_or_path": model_dir, "logging_steps": 1,
                             "resume_from_checkpoint": False, "dataloader_num_workers": 0, "num_ppo_epochs": 1}  # fmt: skip
    if "steps_per_generation" not in keys:  # GRPO/RLOO: accumulation sets the generation batch, so it stays
        flags["gradient_accumulation_steps"] = 1
    max_steps = values.get("max_steps")
    flags["max_steps"] = (
        min(max_steps, DRY_RUN_STEPS) if isinstance(max_steps, int) and max_steps > 0 else DRY_RUN_STEPS
    )
    for key, cap in (("max_train_samples", DRY_RUN_ROWS), ("max_eval_samples", DRY_RUN_EVAL_ROWS),
                     ("max_completion_length", DRY_RUN_NEW_TOKENS), ("max_new_tokens", DRY_RUN_NEW_TOKENS)):  # fmt: skip
        current = values.get(key)
        flags[key] = min(current, cap) if current else cap
    for key in ("ref_model_name_or_path",):
        if values.get(key):
            flags[key] = model_dir
    for key in ("reward_model_path", "value_model_path"):
        if values.get(key):
            flags[key] = reward_dir
    # stored logps belong to the real model's tokenizer: the tiny model is a live reference instead
    if values.get("ref_logps_dir"):
        flags["ref_logps_dir"] = ""
    if values.get("fsdp"):  # one CPU process
        flags["fsdp"] = ""
    if values.get("attn_implementation") not in (None, "eager", "sdpa"):
        flags["attn_implementation"] = "sdpa"
    optim = getattr(values.get("optim"), "value", values.get("optim"))
    if optim is not None and str(optim) not in CPU_OPTIMIZERS:
        flags["optim"] = "adamw_torch"
    out = _as_flags(flags, keys)
    logger.warning("dry run: tiny model %s, %s steps, at most %d rows, fp32 on the CPU, no tracker; output in %s",
                   model_dir, flags["max_steps"], flags["max_train_samples"], output_dir)  # fmt: skip
    return out


def dry_run_reference_logps(model_dir: str, tokenizer, table, response_key: str, max_length: int):
    """(first rows of `table`, {uid: logps}) scored by the tiny model: in a dry run the stored reference
    logps belong to the real model's tokenizer and cannot line up with the tiny one's tokens."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.scoring import response_logps
    from pipeline.tokenization import parse_prompt, tokenize_prompt_response

    table = table.slice(0, DRY_RUN_ROWS)
    prompts = [parse_prompt(p) for p in table.column("prompt_pretokenized").to_pylist()]
    samples = tokenize_prompt_response(tokenizer, prompts, table.column(response_key).to_pylist(), max_length)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        values = response_logps(model, samples, tokenizer.pad_token_id)
    uids = table.column("uid").to_pylist()
    return table, {uid: np.asarray(v, dtype=np.float32) for uid, v in zip(uids, values, strict=True)}
