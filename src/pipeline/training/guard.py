"""The checkpoint guard: complete-or-absent checkpoints the pipeline began, their rotation, and the step
phase and RNG state the out-of-memory back-off needs."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.training.resume import (
    BEGUN_MARKER,
    COMPLETE_MARKER,
    barrier,
    checkpoint_folders,
    is_complete_checkpoint,
    is_main,
    is_pipeline_checkpoint,
    process_layout,
)


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def write_complete_marker(folder: Path, step: int, args=None) -> None:
    """The checkpoint is complete; with `args`, also how it was trained (checked when it is resumed)."""
    write_json(
        folder / COMPLETE_MARKER, {"global_step": step, **(process_layout(args) if args is not None else {})}
    )


def write_json(path: Path, data: dict) -> None:
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
        if is_main(trainer.args):
            if folder.exists() and not is_pipeline_checkpoint(folder):
                raise PipelineError(f"{folder} was not written by the pipeline and this run would save into it; "
                                    "move it out of output_dir and resume")  # fmt: skip
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / BEGUN_MARKER, {"global_step": trainer.state.global_step})
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
            barrier()  # every process has written its part of the checkpoint
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if is_main(args) and folder.is_dir():
                write_complete_marker(folder, state.global_step, args)
                _rotate_own_checkpoints(args.output_dir, self.save_total_limit, state.best_model_checkpoint)
            barrier()

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
