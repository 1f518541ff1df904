"""From a recipe (and flags, accelerate/DeepSpeed files, the GPUs visible) to the plan the estimate prices."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data import read_json_object
from pipeline.errors import PipelineError
from pipeline.stages.check.shape import DTYPE_BYTES

STAGES = ("sft", "ips", "dpo", "rm", "grpo", "rloo", "ppo")


# defaults of the stages' config classes (TRL 1.16 SFTConfig/DPOConfig/RewardConfig/GRPOConfig/RLOOConfig,
# our IPSConfig and PPOStageConfig); the tests pin these against the classes
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"max_length": 1024, "gradient_checkpointing": True, "bf16": None},
    "ips": {"max_length": 1024, "gradient_checkpointing": True, "bf16": None},
    "dpo": {"max_length": 1024, "gradient_checkpointing": True, "bf16": None, "beta": 0.1},
    "rm": {"max_length": 1024, "gradient_checkpointing": True, "bf16": None},
    "grpo": {"max_completion_length": 512, "gradient_checkpointing": True, "bf16": None, "beta": 0.0},
    "rloo": {"max_completion_length": 512, "gradient_checkpointing": True, "bf16": None, "beta": 0.05},
    "ppo": {"max_prompt_length": 512, "max_new_tokens": 64, "gradient_checkpointing": None, "bf16": False},
}


DEFAULT_PROMPT_LENGTH = 512  # grpo/rloo prompts are not truncated by TRL 1.16; assumed unless given


STAGE_KEYS = (  # keys that only one stage's recipe has, to tell the stage when neither flag nor file name does
    ("ppo", ("num_ppo_epochs", "cliprange_value", "vf_coef", "value_model_path", "max_new_tokens")),
    ("grpo", ("num_generations", "max_completion_length", "steps_per_generation")),
    ("ips", ("is_clip_max", "is_clip_min", "datafilter", "logp_dir", "ref_tag")),
    ("dpo", ("ref_logps_dir", "rpo_alpha", "precompute_ref_log_probs", "ref_model_name_or_path")),
    ("rm", ("center_rewards_coefficient",)),
)


@dataclass
class Plan:
    """Everything the estimate depends on, resolved from recipe + flags + stage defaults."""

    stage: str
    num_gpus: int
    engine: str  # single | ddp | deepspeed | fsdp
    zero: int | None
    offload: bool
    micro_batch: int
    grad_accum: int
    seq_len: int  # tokens per training sequence
    prompt_len: int  # generation stages
    completion_len: int  # generation stages (logits only over these)
    gradient_checkpointing: bool
    mixed_precision: str  # bf16 | fp16 | no
    dtype: str  # loaded weights: float32 | bfloat16 | float16
    optim: str
    use_peft: bool
    lora_r: int
    lora_target_modules: Any
    lora_dropout: float
    load_in_4bit: bool
    load_in_8bit: bool
    nested_quant: bool
    reference: str  # what the reference model is: "none", "copy", "lora base", "stored logps"
    reward_model_path: str | None = None
    value_model_path: str | None = None
    reward_model: bool = False
    generation_batch: int = 0  # sequences generated at once (KV cache); 0: no generation in the stage
    policy_only: bool = False  # what the probe runs: no reference, critic, reward model or generation
    notes: list[str] = field(default_factory=list)

    @property
    def train_sequences(self) -> int:
        """Sequences in one micro-batch's forward (DPO and reward models: chosen and rejected)."""
        return self.micro_batch * (2 if self.stage in ("dpo", "rm") else 1)

    @property
    def logit_tokens(self) -> int:
        if self.stage == "rm":
            return 0
        if self.stage in ("grpo", "rloo"):
            return self.micro_batch * self.completion_len
        return self.train_sequences * self.seq_len

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.num_gpus

    def describe(self) -> str:
        gpus = f"{self.num_gpus} GPU{'s' if self.num_gpus > 1 else ''}"
        offload = " + CPU offload" if self.offload else ""
        what = {
            "deepspeed": f"DeepSpeed ZeRO-{self.zero}{offload} over {gpus}",
            "fsdp": f"FSDP2 (full shard){offload} over {gpus}",
            "ddp": f"DDP over {gpus}",
            "single": "one process on one GPU",
        }[self.engine]
        mp = {"bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision", "no": "no mixed precision"}
        return f"{what}, {mp[self.mixed_precision]}, weights loaded in {self.dtype}"


def load_recipe(path: str) -> dict[str, Any]:
    from pipeline.configs import read_recipe_file

    return read_recipe_file(path)


def infer_stage(path: str, recipe: dict) -> tuple[str, str]:
    """(stage, how it was decided) from the file name or the recipe's stage-specific keys."""
    tokens = re.split(r"[^a-z]+", Path(path).stem.lower())
    for stage in STAGES:
        if stage in tokens:
            return stage, "from the file name"
    for stage, keys in STAGE_KEYS:
        found = [k for k in keys if k in recipe]
        if found:
            if stage == "grpo" and "rloo" in str(path).lower():
                stage = "rloo"
            return stage, f"from the recipe key '{found[0]}'"
    return "sft", "default: no stage-specific key"


def as_bool(key: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.lower() in ("true", "yes", "1")
    raise PipelineError(f"'{key}' must be true or false, got {value!r}")


def _as_int(key: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
        if number is None:
            raise ValueError
        return number
    except (TypeError, ValueError):
        raise PipelineError(f"'{key}' must be an integer, got {value!r}") from None


def _deepspeed_choice(value: Any, base: Path) -> tuple[int | None, bool]:
    """(ZeRO stage, offload) of a recipe's `deepspeed` entry (a JSON path or an inline mapping)."""
    if isinstance(value, str):
        path = Path(value) if Path(value).is_file() else base / value
        if not path.is_file():
            raise PipelineError(f"deepspeed: file not found: '{value}'")
        value = read_json_object(path)
    if not isinstance(value, dict):
        raise PipelineError("deepspeed: expected a JSON file path or a mapping")
    zero = value.get("zero_optimization", {}) or {}
    stage = _as_int("zero_optimization.stage", zero.get("stage", 0))
    offload = any(
        isinstance(zero.get(k), dict) and zero[k].get("device", "none") not in ("none", None)
        for k in ("offload_optimizer", "offload_param")
    )
    return stage, offload


def _accelerate_choice(path: str) -> dict[str, Any]:
    """Engine, ZeRO stage, offload and process count of an accelerate config YAML."""
    if not os.path.isfile(path):
        raise PipelineError(f"--accelerate_config: file not found: '{path}'")
    cfg = load_recipe(path)
    kind = str(cfg.get("distributed_type", "NO")).upper()
    out: dict[str, Any] = {"num_gpus": _as_int("num_processes", cfg.get("num_processes"))}
    if kind == "DEEPSPEED":
        ds = cfg.get("deepspeed_config", {}) or {}
        if ds.get("deepspeed_config_file"):
            out["zero"], out["offload"] = _deepspeed_choice(
                ds["deepspeed_config_file"], Path(path).parent.parent
            )
        else:
            out["zero"] = _as_int("zero_stage", ds.get("zero_stage", 2))
            out["offload"] = any(ds.get(k) not in (None, "none") for k in ("offload_optimizer_device",
                                                                            "offload_param_device"))  # fmt: skip
    elif kind == "FSDP":
        fsdp = cfg.get("fsdp_config", {}) or {}
        out["fsdp"], out["offload"] = (
            True,
            bool(as_bool("fsdp_offload_params", fsdp.get("fsdp_offload_params"))),
        )
    return out


def visible_gpus() -> list[dict[str, Any]]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": props.name, "total_bytes": int(props.total_memory)})
    return gpus


def _picker(recipe: dict, defaults: dict):
    """A value: the command-line flag, else the recipe, else the stage's default."""

    def pick(key: str, flag: Any = None, default: Any = None) -> Any:
        if flag is not None:
            return flag
        if recipe.get(key) is not None:
            return recipe[key]
        return defaults.get(key, default)

    return pick


def _engine(args: argparse.Namespace, recipe: dict, gpus: list[dict]) -> tuple[str, int | None, bool, int]:
    """(engine, ZeRO stage, offload, processes) from the flags, the accelerate config or the recipe."""
    acc = _accelerate_choice(args.accelerate_config) if args.accelerate_config else {}
    zero, offload, fsdp = args.zero, args.offload, args.fsdp
    if zero is None and not fsdp:
        if "zero" in acc:
            zero, offload = acc["zero"], offload or acc["offload"]
        elif acc.get("fsdp"):
            fsdp, offload = True, offload or acc["offload"]
        elif recipe.get("deepspeed"):
            zero, ds_offload = _deepspeed_choice(recipe["deepspeed"], Path(args.config).parent)
            offload = offload or ds_offload
        elif recipe.get("fsdp"):
            fsdp = True
            offload = offload or "offload" in str(recipe["fsdp"])
    if zero is not None and fsdp:
        raise PipelineError("--zero and --fsdp exclude each other (DeepSpeed or FSDP, not both)")
    num_gpus = args.num_gpus or acc.get("num_gpus") or max(len(gpus), 1)
    if num_gpus < 1:
        raise PipelineError(f"--num_gpus must be at least 1, got {num_gpus}")
    engine = "fsdp" if fsdp else "deepspeed" if zero is not None else "ddp" if num_gpus > 1 else "single"
    if offload and engine not in ("fsdp", "deepspeed") or (offload and zero == 0):
        raise PipelineError("--offload needs --zero 1|2|3 or --fsdp (ZeRO-Offload / FSDP CPU offload)")
    return engine, zero, bool(offload), num_gpus


def _precision(pick, gpus: list[dict], config_dtype: str | None, notes: list[str]) -> tuple[str, str]:
    """(mixed precision, dtype the weights load in)."""
    bf16 = as_bool("bf16", pick("bf16"))
    fp16 = as_bool("fp16", pick("fp16", default=False))
    if fp16:
        mixed = "fp16"
    elif bf16 is None:  # the stages' parser turns bf16 on where the GPU has it
        if gpus:
            import torch

            mixed = "bf16" if torch.cuda.is_bf16_supported() else "no"
        else:
            mixed = "bf16"
            notes.append("bf16 unset: assumed on (what the stages do on a GPU with bf16)")
    else:
        mixed = "bf16" if bf16 else "no"
    dtype = str(pick("dtype", default="float32"))  # TRL's ModelConfig default
    if dtype == "auto":
        dtype = config_dtype if config_dtype in DTYPE_BYTES else "float32"
        notes.append(f"dtype auto: the model's config.json gives {dtype}")
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(dtype, dtype)
    if dtype not in DTYPE_BYTES:
        raise PipelineError(f"'dtype' must be float32, bfloat16, float16 or auto, got {dtype!r}")
    return mixed, dtype


def _lengths(stage: str, args: argparse.Namespace, recipe: dict, pick, micro: int, accum: int,
             notes: list[str]) -> tuple[int, int, int, int]:  # fmt: skip
    """(sequence, prompt, completion lengths, sequences generated at once) for the stage."""
    if stage in ("grpo", "rloo"):
        completion_len = _as_int("max_completion_length", pick("max_completion_length", args.max_length))
        given = recipe.get("max_prompt_length") if args.prompt_length is None else args.prompt_length
        prompt_len = _as_int("max_prompt_length", given if given is not None else DEFAULT_PROMPT_LENGTH)
        if given is None:
            notes.append(f"prompt length not in the recipe: assumed {prompt_len} tokens (--prompt_length)")
        generation_batch = 0
        if not as_bool("use_vllm", recipe.get("use_vllm")):
            steps = _as_int("steps_per_generation", recipe.get("steps_per_generation")) or accum
            generation_batch = micro * steps
        return prompt_len + completion_len, prompt_len, completion_len, generation_batch
    if stage == "ppo":
        prompt_len = _as_int("max_prompt_length", args.prompt_length or pick("max_prompt_length"))
        completion_len = _as_int("max_new_tokens", pick("max_new_tokens", args.max_length))
        generation_batch = micro * accum * (_as_int("num_mini_batches", recipe.get("num_mini_batches")) or 1)
        return prompt_len + completion_len, prompt_len, completion_len, generation_batch
    return _as_int("max_length", pick("max_length", args.max_length)), 0, 0, 0


def _reference(stage: str, recipe: dict, pick, use_peft: bool) -> str:
    """What the stage compares the policy with: a frozen copy, the LoRA base, stored logps, or nothing."""
    if stage == "dpo":
        if recipe.get("ref_logps_dir") or as_bool(
            "precompute_ref_log_probs", recipe.get("precompute_ref_log_probs")
        ):
            return "stored logps"
        return "lora base" if use_peft and not recipe.get("ref_model_name_or_path") else "copy"
    if stage in ("grpo", "rloo", "ppo"):
        beta = float(pick("beta", default=0.0)) if stage != "ppo" else 1.0
        return "none" if beta == 0 else "lora base" if use_peft else "copy"
    return "stored logps" if stage == "ips" else "none"


def build_plan(args: argparse.Namespace, recipe: dict, gpus: list[dict], config_dtype: str | None = None
               ) -> tuple[Plan, str]:  # fmt: skip
    stage, how = (args.stage, "from --stage") if args.stage else infer_stage(args.config, recipe)
    pick = _picker(recipe, STAGE_DEFAULTS[stage])
    notes: list[str] = []
    engine, zero, offload, num_gpus = _engine(args, recipe, gpus)
    if stage == "ppo" and (zero == 3 or engine == "fsdp"):
        notes.append("pipeline ppo refuses ZeRO-3 and FSDP (generation needs whole weights): use --zero 2")
    mixed, dtype = _precision(pick, gpus, config_dtype, notes)
    micro = _as_int(
        "per_device_train_batch_size",
        pick("per_device_train_batch_size", args.per_device_train_batch_size, 8),
    )
    accum = _as_int("gradient_accumulation_steps", pick("gradient_accumulation_steps", args.gradient_accumulation_steps, 1))  # fmt: skip
    if micro < 1 or accum < 1:
        raise PipelineError("per_device_train_batch_size and gradient_accumulation_steps must be at least 1")
    gc = as_bool("gradient_checkpointing", pick("gradient_checkpointing", args.gradient_checkpointing))
    seq_len, prompt_len, completion_len, generation_batch = _lengths(
        stage, args, recipe, pick, micro, accum, notes
    )
    use_peft = bool(as_bool("use_peft", recipe.get("use_peft")))
    load_4 = bool(as_bool("load_in_4bit", recipe.get("load_in_4bit")))
    load_8 = bool(as_bool("load_in_8bit", recipe.get("load_in_8bit")))
    if (load_4 or load_8) and not use_peft:
        notes.append("load_in_4bit/load_in_8bit train through LoRA (use_peft: true); without it this counts "
                     f"plain full training in {dtype}")  # fmt: skip
    funcs = recipe.get("reward_funcs", "")
    funcs = funcs if isinstance(funcs, list) else str(funcs).split(",")
    reward_model = stage in ("grpo", "rloo", "ppo") and "reward_model" in [str(f).strip() for f in funcs]
    plan = Plan(
        stage=stage, num_gpus=num_gpus, engine=engine, zero=zero, offload=offload, micro_batch=micro,
        grad_accum=accum, seq_len=seq_len, prompt_len=prompt_len, completion_len=completion_len,
        gradient_checkpointing=bool(gc), mixed_precision=mixed, dtype=dtype,
        optim=str(recipe.get("optim", "adamw_torch")), use_peft=use_peft,
        lora_r=_as_int("lora_r", recipe.get("lora_r", 16)), lora_target_modules=recipe.get("lora_target_modules"),
        lora_dropout=float(recipe.get("lora_dropout", 0.05) or 0.0), load_in_4bit=load_4, load_in_8bit=load_8,
        nested_quant=bool(as_bool("use_bnb_nested_quant", recipe.get("use_bnb_nested_quant"))),
        reference=_reference(stage, recipe, pick, use_peft), reward_model_path=recipe.get("reward_model_path"),
        value_model_path=recipe.get("value_model_path"), reward_model=reward_model,
        generation_batch=generation_batch, notes=notes,
    )  # fmt: skip
    return plan, how
