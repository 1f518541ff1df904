"""Out-of-memory back-off: retry a failing step at a smaller micro-batch with the global batch kept."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.training.guard import guard_of, set_rng_state, write_complete_marker
from pipeline.training.resume import checkpoint_folders, is_main, resolve_resume

logger = logging.getLogger("pipeline.training")


OOM_DIR = ".oom-backoff"  # where the state before a failing step is saved for the restart
BACKOFF_FILE = "oom_backoff.json"  # the smaller split the next attempt of a multi-process run starts at


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
        set_rng_state(guard.rng)
    # a full checkpoint (optimizer included) into the scratch folder, whatever the recipe says of its own
    with _args_set(trainer.args, output_dir=str(scratch), save_only_model=False, push_to_hub=False,
                   save_total_limit=None):  # fmt: skip
        trainer._save_checkpoint(trainer.model_wrapped, trial=None)
    folder = scratch / f"checkpoint-{step}"
    write_complete_marker(folder, step, trainer.args)
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


def _set_batch(trainer, micro: int, accum: int) -> None:
    """Micro-batch and accumulation (the dataloader is rebuilt from these by `train()`)."""
    args = trainer.args
    factor = accum // args.gradient_accumulation_steps if accum >= args.gradient_accumulation_steps else 1
    args.per_device_train_batch_size, args.gradient_accumulation_steps = micro, accum
    if getattr(args, "steps_per_generation", None) and factor > 1:
        args.steps_per_generation *= factor  # GRPO/RLOO: one generation batch stays one optimizer step
    trainer._train_batch_size = args.train_batch_size
    if hasattr(trainer, "_buffered_inputs"):  # GRPO/RLOO: completions are regenerated at the restart
        trainer._buffered_inputs = None
        trainer._step = trainer.state.global_step * args.gradient_accumulation_steps
    if getattr(trainer, "is_deepspeed_enabled", False):
        from transformers.integrations.deepspeed import propagate_args_to_deepspeed

        propagate_args_to_deepspeed(trainer.accelerator, args, auto_find_batch_size=False)


def _shrink_batch(trainer, factor: int) -> None:
    """Micro-batch / factor, accumulation × factor: the global batch is kept."""
    args = trainer.args
    _set_batch(trainer, args.per_device_train_batch_size // factor, args.gradient_accumulation_steps * factor)


def _record_backoff(trainer, micro: int, accum: int, where: str) -> Path:
    """For a run of several processes: the smaller split, read by every process of the next attempt."""
    path = Path(trainer.args.output_dir) / BACKOFF_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # the failing process may be any rank
    tmp.write_text(json.dumps({"per_device_train_batch_size": micro, "gradient_accumulation_steps": accum,
                               "world_size": trainer.args.world_size, "reason": where}) + "\n")  # fmt: skip
    os.replace(tmp, path)
    return path


def apply_recorded_backoff(trainer) -> dict | None:
    """At the start of an attempt: the split an out-of-memory error on an earlier attempt asked for, applied
    on every process alike (they all read one file), when it keeps this run's global batch."""
    path = Path(trainer.args.output_dir) / BACKOFF_FILE
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())
    args = trainer.args
    micro, accum = recorded["per_device_train_batch_size"], recorded["gradient_accumulation_steps"]
    if (
        micro * accum * recorded.get("world_size", args.world_size)
        != (args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size)
        or micro >= args.per_device_train_batch_size
    ):
        return None  # another global batch (another run), or nothing smaller than asked
    _set_batch(trainer, micro, accum)
    logger.warning("an earlier attempt ran out of memory (%s): per_device_train_batch_size %d x "
                   "gradient_accumulation_steps %d (global batch unchanged)", recorded.get("reason"), micro, accum)  # fmt: skip
    return {"per_device_train_batch_size": micro, "gradient_accumulation_steps": accum, "from": BACKOFF_FILE}


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
    if micro == 1:
        raise PipelineError(f"{where}: nothing left to shrink; use LoRA/QLoRA (use_peft, load_in_4bit), "
                            "gradient_checkpointing, a shorter max_length or DeepSpeed ZeRO-3 with offload")  # fmt: skip
    if args.world_size > 1:
        # the other processes wait in a collective: a clean retry needs them all, so this attempt stops and
        # the next one (a rerun, or torchrun --max_restarts) starts every process at the smaller split
        factor = _smallest_factor(micro)
        path = _record_backoff(trainer, micro // factor, accum * factor, where)
        raise PipelineError(f"{where} on one of {args.world_size} processes; run the same command again: every "
                            f"process resumes from the last checkpoint at per_device_train_batch_size "
                            f"{micro // factor} x gradient_accumulation_steps {accum * factor} (global batch "
                            f"unchanged; recorded in {path})")  # fmt: skip
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
    if is_main(trainer.args):
        shutil.rmtree(scratch, ignore_errors=True)
    info: dict = {"resumed_from": start, "oom_backoffs": []}
    recorded = apply_recorded_backoff(trainer)
    if recorded:
        info["oom_backoffs"].append(recorded)
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
    if is_main(trainer.args):
        shutil.rmtree(scratch, ignore_errors=True)
        (Path(trainer.args.output_dir) / BACKOFF_FILE).unlink(missing_ok=True)
    if info["oom_backoffs"]:
        info["per_device_train_batch_size"] = trainer.args.per_device_train_batch_size
        info["gradient_accumulation_steps"] = trainer.args.gradient_accumulation_steps
    return result, info
