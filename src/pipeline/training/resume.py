"""Resume: which checkpoint a run starts from, which of the pipeline's own checkpoints go first, and refusing
to continue another run's folder."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

logger = logging.getLogger("pipeline.training")


COMPLETE_MARKER = "checkpoint_complete.json"


BEGUN_MARKER = "checkpoint_begun.json"


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def is_main(args) -> bool:
    return bool(getattr(args, "should_save", True))


def barrier() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


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
    barrier()  # every process has looked before anything is deleted
    if is_main(args) and ours:
        for path in ours:
            shutil.rmtree(path)
        logger.warning("deleted checkpoints of this pipeline past the starting step or cut off while saving, "
                       "which this run replaces: %s", ", ".join(p.name for p in ours))  # fmt: skip
    barrier()
    if start:
        check_process_layout(start, args)
        logger.info("resuming from %s", start)
    return start


def process_layout(args) -> dict:
    """Processes, engine and batch split of a run: what a resume must keep or may change."""
    # `accelerate launch` with a DeepSpeed or FSDP config says so in the environment, not in the args
    if (
        getattr(args, "deepspeed", None)
        or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    ):
        engine = "deepspeed"
    elif getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        engine = "fsdp"
    else:
        engine = "ddp"
    return {"world_size": args.world_size, "engine": engine, "per_device_train_batch_size":
            args.per_device_train_batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps}  # fmt: skip


def check_process_layout(checkpoint: str, args) -> None:
    """A checkpoint resumes only where the training it continues stays the same: the same global batch
    (micro-batch × accumulation × processes; how it is split may change, as the out-of-memory back-off
    does), and under DeepSpeed or FSDP the same number of processes (each holds its own shard of the
    optimizer state, which this version does not re-shard). One line naming both counts otherwise."""
    marker = Path(checkpoint) / COMPLETE_MARKER
    saved = json.loads(marker.read_text()) if marker.is_file() else {}
    if "world_size" not in saved:  # an older or foreign checkpoint: nothing recorded to compare
        return
    now = process_layout(args)
    name = Path(checkpoint).name
    if saved["world_size"] != now["world_size"] and "ddp" not in (saved["engine"], now["engine"]):
        raise PipelineError(
            f"{name} was saved by {saved['world_size']} processes under {saved['engine']}, this run has "
            f"{now['world_size']}: each process holds its own shard of the optimizer state, which cannot be "
            f"re-sharded here; resume with {saved['world_size']} processes, or start afresh with "
            "resume_from_checkpoint: false"
        )
    old = saved["per_device_train_batch_size"] * saved["gradient_accumulation_steps"] * saved["world_size"]
    new = now["per_device_train_batch_size"] * now["gradient_accumulation_steps"] * now["world_size"]
    if old != new:
        per = now["per_device_train_batch_size"] * now["world_size"]
        keep = (f"; with {now['world_size']} processes of micro-batch {now['per_device_train_batch_size']}, "
                f"gradient_accumulation_steps {old // per} keeps it") if old % per == 0 else ""  # fmt: skip
        raise PipelineError(
            f"{name} was trained at a global batch of {old} ({saved['world_size']} processes × "
            f"{saved['per_device_train_batch_size']} × {saved['gradient_accumulation_steps']} accumulation), this "
            f"run at {new} ({now['world_size']} × {now['per_device_train_batch_size']} × "
            f"{now['gradient_accumulation_steps']}): the resumed run would not continue the same training{keep}"
        )
    if saved["world_size"] != now["world_size"]:
        logger.info("resuming %s, saved by %d processes, with %d (global batch %d kept)", name,
                    saved["world_size"], now["world_size"], new)  # fmt: skip


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
    "local_rank", "ddp_backend", "use_cpu", "trust_checkpoint", "save_every_minutes", "token_view_dir",
    # how the global batch is split; a resume checks the global batch itself (`check_process_layout`)
    "per_device_train_batch_size", "gradient_accumulation_steps",
})  # fmt: skip


def _global_batch_difference(previous: dict, old: dict, new: dict) -> str | None:
    """The global batch (micro-batch × accumulation × processes) of the two runs, when it differs: how it is
    split may change on a resume, the batch itself may not."""
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps")
    if not all(k in old and k in new for k in keys):
        return None
    there = old[keys[0]] * old[keys[1]] * int(previous.get("world_size") or 1)
    here = new[keys[0]] * new[keys[1]] * int(os.environ.get("WORLD_SIZE", "1"))
    return f"global batch: {there} there, {here} here" if there != here else None


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
    batch = _global_batch_difference(previous, old, new)
    if batch:
        differ.append(batch)
    if differ:
        more = f"; and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise PipelineError(
            f"output_dir '{output_dir}' holds another run ({'; '.join(differ[:4])}{more}), which resuming would "
            "continue under this run's settings; use another output_dir, or resume_from_checkpoint: false to "
            "start afresh there (its checkpoints are replaced)"
        )
