"""What makes a failure a non-event in the TRL-based training stages (sft, rm, dpo, grpo, rloo, ips).

- **Resume** (`resolve_resume`): a stage rerun with the same `output_dir` continues from its last complete
  checkpoint; `resume_from_checkpoint: false` starts afresh, a path resumes from that checkpoint.
- **Complete-or-absent checkpoints** (`CheckpointGuard`): the Trainer writes `checkpoint-N/` file by file,
  so a job killed mid-save leaves a folder that looks like a checkpoint. Before the Trainer writes, the
  main process puts `checkpoint_begun.json` there; once every process has finished saving, it adds
  `checkpoint_complete.json` (written to a temporary name, then renamed). Only folders holding the latter
  are resumed from. The checkpoints this pipeline began past the step a run starts from (a cut-off save,
  or an old run's) are deleted before training, so no later restart can pick one up. A `checkpoint-N` the
  pipeline did not begin (plain TRL, copied in) is never deleted and never resumed unless named; one this
  run could save over is refused before training. `save_total_limit` rotates only the pipeline's own.
- **Out-of-memory back-off** (`run_training`): on an out-of-memory error inside a training step the
  micro-batch is divided by its smallest prime factor (halved when even) and gradient accumulation
  multiplied by it, so the global batch is unchanged; memory is freed and training restarts from the
  state before the failing step (the weights, optimizer and scheduler are untouched until the optimizer
  step, so they are saved as they are, with the random-number state of the step's start). Gives up with
  one line at micro-batch 1.
- **Dry run** (`dry_run_flags`, applied by `pipeline.configs.parse_stage_args`, so PPO has it too):
  `--dry_run true` swaps in a tiny random model (and reward model) built on the fly and runs 2 steps on at
  most 16 rows (4 eval rows, generations of at most 32 tokens) in fp32 on the CPU, with no tracker, into a
  separate output folder.
- **Usable final models** (`merge_saved_adapter`): with `merge_lora: true` a LoRA run's output is the merged
  model, which `from_pretrained` loads without our code; the adapter is kept in `adapter/`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

logger = logging.getLogger("pipeline.resilience")

COMPLETE_MARKER = "checkpoint_complete.json"
BEGUN_MARKER = "checkpoint_begun.json"
OOM_DIR = ".oom-backoff"  # where the state before a failing step is saved for the restart
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
DRY_RUN_STEPS = 2
DRY_RUN_ROWS = 16
DRY_RUN_EVAL_ROWS = 4
DRY_RUN_NEW_TOKENS = 32  # generation length cap (GRPO/RLOO completions, PPO responses)
DRY_RUN_MODEL = "dry_run_model"
DRY_RUN_REWARD_MODEL = "dry_run_reward_model"
# optimizers that run on any CPU; others (bitsandbytes, apex, paged...) are replaced in a dry run
CPU_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")


def _is_main(args) -> bool:
    return bool(getattr(args, "should_save", True))


def _barrier() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------------------ resume


def resume_setting(value: Any) -> str | None:
    """`resume_from_checkpoint` as given (YAML bool, CLI string or path): "auto", "fresh" or the path."""
    if value is None or value is True:
        return "auto"
    if value is False:
        return "fresh"
    text = str(value).strip()
    if text.lower() in ("true", "auto", "yes"):
        return "auto"
    if text.lower() in ("false", "no", "none", ""):
        return "fresh"
    return text


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def checkpoint_folders(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()
    ]
    return sorted(found)


def is_pipeline_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint this pipeline began (complete or cut off while saving)."""
    return is_complete_checkpoint(path) or (Path(path) / BEGUN_MARKER).is_file()


def _start_of(output_dir: str, setting: str) -> tuple[str | None, int]:
    """(checkpoint to start from, its step) for a resume setting; "auto" takes the last complete one of ours."""
    if setting == "fresh":
        return None, 0
    if setting == "auto":
        complete = [(n, p) for n, p in checkpoint_folders(output_dir) if is_complete_checkpoint(p)]
        return (str(complete[-1][1]), complete[-1][0]) if complete else (None, 0)
    state_file = Path(setting) / "trainer_state.json"
    if not state_file.is_file():
        raise PipelineError(
            f"resume_from_checkpoint: '{setting}' is not a checkpoint (no trainer_state.json)"
        )
    return setting, json.loads(state_file.read_text()).get("global_step", 0)


def resolve_resume(args, value: Any = None) -> str | None:
    """The checkpoint this run starts from (None: from scratch), after removing the checkpoints of
    `args.output_dir` that this pipeline began past it (or cut off while saving). A `checkpoint-N` it did not
    begin is left alone; one past the start (which this run could save into) is refused in one line. Every
    process calls this; only the saving process deletes."""
    output_dir = args.output_dir
    start, step = _start_of(output_dir, resume_setting(value))
    named = Path(start).resolve() if start else None
    ours, foreign = [], []
    for n, path in checkpoint_folders(output_dir):
        if path.resolve() == named:
            continue
        if is_pipeline_checkpoint(path):
            if n > step or not is_complete_checkpoint(path):
                ours.append(path)
        elif n > step:
            foreign.append(path)
    if foreign:
        raise PipelineError(
            f"output_dir '{output_dir}' holds {', '.join(p.name for p in foreign)}, which the pipeline did not "
            f"write and this run (from step {step}) could save over; nothing was changed: move it out of "
            "output_dir, or name it with resume_from_checkpoint to start from it"
        )
    _barrier()  # every process has looked before anything is deleted
    if _is_main(args) and ours:
        for path in ours:
            shutil.rmtree(path)
        logger.warning("deleted checkpoints of this pipeline past the starting step or cut off while saving, "
                       "which this run replaces: %s", ", ".join(p.name for p in ours))  # fmt: skip
    _barrier()
    if start:
        logger.info("resuming from %s", start)
    return start


# Config fields that do not change what is trained (where it is written, logged, evaluated or saved, how
# data is loaded): a run may be resumed with other values of these. Every other field must match.
NOT_TRAINING_FIELDS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "dry_run", "merge_lora", "run_name",
    "project", "trackio_space_id", "report_to", "logging_dir", "logging_strategy", "logging_steps",
    "logging_first_step", "logging_nan_inf_filter", "log_level", "log_level_replica", "log_on_each_node",
    "disable_tqdm", "save_strategy", "save_steps", "save_total_limit", "save_only_model", "save_safetensors",
    "save_on_each_node", "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "eval_data",
    "per_device_eval_batch_size", "eval_accumulation_steps", "max_eval_samples", "eval_do_concat_batches",
    "eval_use_gather_object", "prediction_loss_only", "batch_eval_metrics", "include_for_metrics",
    "metric_for_best_model", "greater_is_better", "load_best_model_at_end", "dataloader_num_workers",
    "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor", "push_to_hub",
    "hub_model_id", "hub_strategy", "hub_private_repo", "hub_always_push", "hub_revision", "skip_memory_metrics",
    "include_num_input_tokens_seen", "include_tokens_per_second", "ddp_timeout", "logp_mismatch_threshold",
    "local_rank", "ddp_backend", "use_cpu", "trust_checkpoint",
})  # fmt: skip


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def refuse_resuming_another_run(output_dir: str, stage: str, configs: tuple, resume_value: Any) -> None:
    """Automatic resume continues only the same run. When `output_dir` holds checkpoints or a finished model
    of a run whose training-relevant configuration (run.json's `config`, less `NOT_TRAINING_FIELDS`) differs
    from this run's, stop with one line naming the fields, both values and the two ways on. Call it before
    anything is written there (run.json is rewritten at the start of a run)."""
    if resume_setting(resume_value) != "auto":
        return
    from pipeline.runinfo import config_dict, read_run_info

    try:
        previous = read_run_info(output_dir)
    except ValueError:
        previous = {"stage": None, "config": {}, "status": "unreadable run.json"}
    if previous is None:
        return
    if not checkpoint_folders(output_dir) and previous.get("status") != "completed":
        return  # nothing to resume: training starts from scratch
    old, new = previous.get("config") or {}, config_dict(*configs)
    differ = [f"stage: {previous.get('stage')} there, {stage} here"] if previous.get("stage") != stage else []
    differ += [f"{key}: {_shown(old[key])} there, {_shown(new[key])} here" for key in sorted(set(old) & set(new))
               if key not in NOT_TRAINING_FIELDS and old[key] != new[key]]  # fmt: skip
    if differ:
        more = f"; and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise PipelineError(
            f"output_dir '{output_dir}' holds another run ({'; '.join(differ[:4])}{more}), which resuming would "
            "continue under this run's settings; use another output_dir, or resume_from_checkpoint: false to "
            "start afresh there (its checkpoints are replaced)"
        )


# ------------------------------------------------------------------------------------------------ callback


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_marker(folder: Path, step: int) -> None:
    _write_json(folder / COMPLETE_MARKER, {"global_step": step})


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def _rotate_own_checkpoints(output_dir: str, limit: int | None, best: str | None) -> None:
    """`save_total_limit` over this pipeline's complete checkpoints only (the newest and the best kept)."""
    if not limit or limit <= 0:
        return
    ours = [p for _, p in checkpoint_folders(output_dir) if is_complete_checkpoint(p)]
    keep = {ours[-1]} if ours else set()
    if best:
        keep.add(Path(best))
    for path in ours[: max(0, len(ours) - max(limit, len(keep)))]:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def _mark_begun_saves(trainer) -> None:
    """Wrap the trainer's checkpoint save: the main process marks `checkpoint-N` as begun by the pipeline
    before anything is written there, and refuses to write into a checkpoint the pipeline did not begin."""
    save = trainer._save_checkpoint

    def save_checkpoint(model, trial):
        folder = Path(trainer._get_output_dir(trial=trial)) / f"checkpoint-{trainer.state.global_step}"
        if _is_main(trainer.args):
            if folder.exists() and not is_pipeline_checkpoint(folder):
                raise PipelineError(f"{folder} was not written by the pipeline and this run would save into it; "
                                    "move it out of output_dir and resume")  # fmt: skip
            folder.mkdir(parents=True, exist_ok=True)
            _write_json(folder / BEGUN_MARKER, {"global_step": trainer.state.global_step})
        return save(model, trial)

    trainer._save_checkpoint = save_checkpoint


def _make_guard():
    from transformers import TrainerCallback

    class CheckpointGuard(TrainerCallback):
        """Marks checkpoints complete once every process has saved, and tracks where in a step the trainer
        is (an out-of-memory error is only retried inside forward/backward) and the RNG state at the step's
        start (restored before the state is saved for a retry)."""

        def __init__(self, save_total_limit: int | None = None):
            self.phase, self.start_step, self.rng = "setup", 0, None
            self.save_total_limit = save_total_limit

        def on_train_begin(self, args, state, control, **kwargs):
            self.phase, self.start_step = "setup", state.global_step

        def on_step_begin(self, args, state, control, **kwargs):
            self.phase, self.rng = "step", _rng_state()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.phase = "optimizer"

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.phase = "step"

        def on_step_end(self, args, state, control, **kwargs):
            self.phase = "between steps"  # logging, evaluation, saving

        def on_save(self, args, state, control, **kwargs):
            _barrier()  # every process has written its part of the checkpoint
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if _is_main(args) and folder.is_dir():
                _write_marker(folder, state.global_step)
                _rotate_own_checkpoints(args.output_dir, self.save_total_limit, state.best_model_checkpoint)
            _barrier()

    return CheckpointGuard


def guard_of(trainer):
    """The trainer's CheckpointGuard, added on first use."""
    cls_name = "CheckpointGuard"
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == cls_name:
            return callback
    # the Trainer's own rotation would delete any checkpoint-N in output_dir: the guard rotates ours only
    guard = _make_guard()(trainer.args.save_total_limit)
    trainer.args.save_total_limit = None
    _mark_begun_saves(trainer)
    trainer.add_callback(guard)
    return guard


# ------------------------------------------------------------------------------------------------ OOM


def is_out_of_memory(err: BaseException) -> bool:
    import torch
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(err, torch.OutOfMemoryError) or should_reduce_batch_size(err)


def _smallest_factor(n: int) -> int:
    return next(p for p in range(2, n + 1) if n % p == 0)


def _free_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _args_set(args, **values):
    old = {k: getattr(args, k) for k in values}
    for k, v in values.items():
        setattr(args, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(args, k, v)


def _save_step_state(trainer, guard, scratch: Path) -> str:
    """Save the trainer's state as it was when the failing step began into `scratch/checkpoint-N`."""
    step = trainer.state.global_step
    if guard.rng is not None:
        _set_rng_state(guard.rng)
    # a full checkpoint (optimizer included) into the scratch folder, whatever the recipe says of its own
    with _args_set(trainer.args, output_dir=str(scratch), save_only_model=False, push_to_hub=False,
                   save_total_limit=None):  # fmt: skip
        trainer._save_checkpoint(trainer.model_wrapped, trial=None)
    folder = scratch / f"checkpoint-{step}"
    _write_marker(folder, step)
    for _, old in checkpoint_folders(scratch):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return str(folder)


def _release_training_objects(trainer) -> None:
    """Drop the optimizer, scheduler and wrapped model (they are rebuilt, and reloaded from the saved state,
    by the next `train()` call); closes the stale progress bar."""
    from transformers.trainer_callback import ProgressCallback

    trainer.accelerator.free_memory()
    trainer.optimizer = trainer.lr_scheduler = None
    trainer._created_lr_scheduler = False
    trainer.model_wrapped = trainer.model
    if getattr(trainer, "deepspeed", None) is not None:
        trainer.deepspeed = None
    for attr in ("optimizer", "lr_scheduler", "train_dataloader"):
        setattr(trainer.callback_handler, attr, None)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
            callback.training_bar.close()
            callback.training_bar = None
    _free_device_memory()


def _shrink_batch(trainer, factor: int) -> None:
    """Micro-batch / factor, accumulation × factor; the dataloader is rebuilt from these by `train()`."""
    args = trainer.args
    args.per_device_train_batch_size //= factor
    args.gradient_accumulation_steps *= factor
    if getattr(
        args, "steps_per_generation", None
    ):  # GRPO/RLOO: one generation batch stays one optimizer step
        args.steps_per_generation *= factor
    trainer._train_batch_size = args.train_batch_size
    if hasattr(trainer, "_buffered_inputs"):  # GRPO/RLOO: completions are regenerated at the restart
        trainer._buffered_inputs = None
        trainer._step = trainer.state.global_step * args.gradient_accumulation_steps
    if getattr(trainer, "is_deepspeed_enabled", False):
        from transformers.integrations.deepspeed import propagate_args_to_deepspeed

        propagate_args_to_deepspeed(trainer.accelerator, args, auto_find_batch_size=False)


def _back_off(trainer, guard, start: str | None, scratch: Path, message: str) -> tuple[str | None, dict]:
    """After an out-of-memory error: where to restart from, with the batch shrunk; or a PipelineError."""
    args = trainer.args
    step = trainer.state.global_step
    micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    where = f"out of memory at step {step + 1} (per_device_train_batch_size {micro}, gradient_accumulation_steps {accum})"
    if guard.phase == "optimizer":
        raise PipelineError(f"{where} in the optimizer step: optimizer states do not shrink with the micro-batch; "
                            "use LoRA (use_peft), an 8-bit optimizer or DeepSpeed ZeRO with offload")  # fmt: skip
    if guard.phase != "step":
        raise PipelineError(f"{where} outside forward/backward ({guard.phase}); lower per_device_eval_batch_size "
                            "or check that the model fits (`pipeline check`)")  # fmt: skip
    if args.world_size > 1:
        # the other processes are waiting in a collective: a clean retry needs them all, so stop with the fix
        raise PipelineError(f"{where} on one of {args.world_size} processes; rerun with per_device_train_batch_size "
                            f"{micro // _smallest_factor(micro)} and gradient_accumulation_steps "
                            f"{accum * _smallest_factor(micro)} (it resumes from the last checkpoint)")  # fmt: skip
    if micro == 1:
        raise PipelineError(f"{where}: nothing left to shrink; use LoRA/QLoRA (use_peft, load_in_4bit), "
                            "gradient_checkpointing, a shorter max_length or DeepSpeed ZeRO-3 with offload")  # fmt: skip
    trainer.model.zero_grad(set_to_none=True)  # the failing step's partial gradients
    _free_device_memory()
    if step == guard.start_step:
        restart = start  # no optimizer step taken in this call: restart it as it began
    else:
        restart = _save_step_state(trainer, guard, scratch)
    _release_training_objects(trainer)
    factor = _smallest_factor(micro)
    _shrink_batch(trainer, factor)
    event = {"step": step + 1, "per_device_train_batch_size": args.per_device_train_batch_size,
             "gradient_accumulation_steps": args.gradient_accumulation_steps, "error": message}  # fmt: skip
    logger.warning("%s: retrying step %d with per_device_train_batch_size %d x gradient_accumulation_steps %d "
                   "(global batch unchanged)", where, step + 1, args.per_device_train_batch_size,
                   args.gradient_accumulation_steps)  # fmt: skip
    return restart, event


def run_training(trainer, resume_from_checkpoint: Any = None):
    """`trainer.train()` with resume from the last complete checkpoint, complete-or-absent checkpoints and
    out-of-memory back-off. Returns (TrainOutput, info for run.json)."""
    guard = guard_of(trainer)
    start = resolve_resume(trainer.args, resume_from_checkpoint)
    scratch = Path(trainer.args.output_dir) / OOM_DIR
    if _is_main(trainer.args):
        shutil.rmtree(scratch, ignore_errors=True)
    info: dict = {"resumed_from": start, "oom_backoffs": []}
    while True:
        guard.phase = "setup"  # until the trainer's first step begins (an OOM there is not the batch's)
        try:
            result = trainer.train(resume_from_checkpoint=start)
            break
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            message = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        # outside the except block, so that the failed step's frames (and their tensors) are released
        start, event = _back_off(trainer, guard, start, scratch, message)
        info["oom_backoffs"].append(event)
    if _is_main(trainer.args):
        shutil.rmtree(scratch, ignore_errors=True)
    if info["oom_backoffs"]:
        info["per_device_train_batch_size"] = trainer.args.per_device_train_batch_size
        info["gradient_accumulation_steps"] = trainer.args.gradient_accumulation_steps
    return result, info


# ------------------------------------------------------------------------------------------------ dry run


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


def limit_rows(dataset, n: int | None, seed: int):
    """The first `n` rows after a seeded shuffle (as `max_train_samples` does for files), or all."""
    if dataset is None or not n or n >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(n))


# ------------------------------------------------------------------------------------------------ final model


def merge_saved_adapter(folder: str | os.PathLike) -> bool:
    """Replace a saved LoRA adapter in `folder` by the merged model (plain safetensors, loadable by
    `from_pretrained` alone); the adapter moves to `folder/adapter`. Main process only. False if no adapter."""
    folder = Path(folder)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        return False
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

    task = json.loads(config_file.read_text()).get("task_type")
    loader = AutoPeftModelForSequenceClassification if task == "SEQ_CLS" else AutoPeftModelForCausalLM
    kwargs = {"num_labels": 1} if task == "SEQ_CLS" else {}
    # the base is loaded again in full precision from its folder: merging into a 4-bit base would be lossy
    model = loader.from_pretrained(str(folder), dtype="auto", **kwargs).merge_and_unload()
    tmp = folder / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    adapter = folder / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    adapter.mkdir()
    for item in list(folder.iterdir()):
        if item.name.startswith("adapter_"):
            os.replace(item, adapter / item.name)
    for item in tmp.iterdir():
        os.replace(item, folder / item.name)
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("merged the LoRA adapter into its base model; the adapter is kept in adapter/")
    return True
