"""What the TRL-based training stages (sft, rm, dpo, grpo, rloo, ips) share, and what makes a failure in them
a non-event.

- `loop`: the train / evaluate / save sequence (`train_evaluate_save`) and the model settings the stages
  share (`model_init_kwargs`, `disable_eval_without_data`).
- `resume` (`resolve_resume`): a stage rerun with the same `output_dir` continues from its last complete
  checkpoint; `resume_from_checkpoint: false` starts afresh, a path resumes from that checkpoint; another
  run's folder is refused (`refuse_resuming_another_run`).
- `guard` (complete-or-absent checkpoints): the Trainer writes `checkpoint-N/` file by file, so a job
  killed mid-save leaves a folder that looks like a checkpoint. Before the Trainer writes, the main process
  puts `checkpoint_begun.json` there; once every process has finished saving, it adds
  `checkpoint_complete.json` (written to a temporary name, then renamed). Only folders holding the latter
  are resumed from. The checkpoints this pipeline began past the step a run starts from (a cut-off save,
  or an old run's) are deleted before training, so no later restart can pick one up. A `checkpoint-N` the
  pipeline did not begin (plain TRL, copied in) is never deleted and never resumed unless named; one this
  run could save over is refused before training. `save_total_limit` rotates only the pipeline's own.
- `oom` (`run_training`): on an out-of-memory error inside a training step the micro-batch is divided by
  its smallest prime factor (halved when even) and gradient accumulation multiplied by it, so the global
  batch is unchanged; memory is freed and training restarts from the state before the failing step (the
  weights, optimizer and scheduler are untouched until the optimizer step, so they are saved as they are,
  with the random-number state of the step's start). Gives up with one line at micro-batch 1.
- `dry_run` (`dry_run_flags`, applied by `pipeline.configs.parse_stage_args`, so PPO has it too):
  `--dry_run true` swaps in a tiny random model (and reward model) built on the fly and runs 2 steps on at
  most 16 rows (4 eval rows, generations of at most 32 tokens) in fp32 on the CPU, with no tracker, into
  `dry_runs/<output_dir>`.
- `final_model`: the final model is assembled in an empty folder and swapped in whole; with
  `merge_lora: true` a LoRA run's output is the merged model, which `from_pretrained` loads without our
  code; the adapter is kept in `adapter/`.
"""

from pipeline.training.dry_run import (
    DRY_RUN_MODEL,
    DRY_RUN_REWARD_MODEL,
    DRY_RUN_ROWS,
    DRY_RUN_STEPS,
    dry_run_flags,
    dry_run_hardware_flags,
    dry_run_output_dir,
    dry_run_reference_logps,
)
from pipeline.training.final_model import (
    FINAL_RECORD,
    final_tmp,
    merge_saved_adapter,
    save_final_model,
    swap_in_final_model,
)
from pipeline.training.guard import guard_of
from pipeline.training.loop import (
    disable_eval_without_data,
    keep_bnb_4bit_trainable_on_cpu,
    model_init_kwargs,
    train_evaluate_save,
)
from pipeline.training.oom import is_out_of_memory, run_training
from pipeline.training.resume import (
    BEGUN_MARKER,
    COMPLETE_MARKER,
    NOT_TRAINING_FIELDS,
    checkpoint_folders,
    is_complete_checkpoint,
    is_pipeline_checkpoint,
    refuse_resuming_another_run,
    resolve_resume,
    resume_setting,
)

__all__ = [
    "BEGUN_MARKER", "COMPLETE_MARKER", "DRY_RUN_MODEL", "DRY_RUN_REWARD_MODEL", "DRY_RUN_ROWS", "DRY_RUN_STEPS",
    "FINAL_RECORD", "NOT_TRAINING_FIELDS", "final_tmp", "checkpoint_folders", "disable_eval_without_data", "dry_run_flags",
    "dry_run_hardware_flags", "dry_run_output_dir", "dry_run_reference_logps", "guard_of",
    "is_complete_checkpoint", "is_out_of_memory", "is_pipeline_checkpoint", "keep_bnb_4bit_trainable_on_cpu",
    "merge_saved_adapter", "model_init_kwargs", "refuse_resuming_another_run", "resolve_resume",
    "resume_setting", "run_training", "save_final_model", "swap_in_final_model", "train_evaluate_save",
]  # fmt: skip
