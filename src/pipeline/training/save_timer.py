"""Checkpoints by the clock: `save_every_minutes` turns a time budget into a step interval.

A run over millions of rows may take days per epoch; `save_strategy: epoch` would then lose everything to
one node failure. After the first `CALIBRATION_STEPS` steps, the main process measures the seconds per
step and sets the interval to the number of steps that fit the budget; the interval is broadcast, so every
rank saves at the same steps (a DeepSpeed or FSDP save is a collective). The Trainer's own save strategy
keeps working beside it.
"""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

logger = logging.getLogger("pipeline.training")

CALIBRATION_STEPS = 10


def _agreed(value: int) -> int:
    """The main process's value on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


class SaveEveryMinutes(TrainerCallback):
    def __init__(self, minutes: float):
        if minutes <= 0:
            raise ValueError("save_every_minutes must be positive")
        self.budget = minutes * 60.0
        self.first_step: int | None = None
        self.started = 0.0
        self.interval: int | None = None
        self.calibrated_at = 0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first_step is None:  # the first step of this call to train() (a resume starts later)
            self.first_step, self.started = state.global_step, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        done = state.global_step - (self.first_step or 0)
        if self.interval is None and done >= CALIBRATION_STEPS:
            per_step = (time.perf_counter() - self.started) / done
            self.interval = _agreed(max(1, int(self.budget // max(per_step, 1e-9))))
            self.calibrated_at = state.global_step
            logger.info("save_every_minutes %.4g: %.3g s per step, a checkpoint every %d steps",
                        self.budget / 60, per_step, self.interval)  # fmt: skip
        since = state.global_step - self.calibrated_at
        if self.interval is not None and since > 0 and since % self.interval == 0:
            control.should_save = True
        return control
