"""Processes and persistence: barriers and gathers, checkpoints of the whole training state, the final policy."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.stages.ppo.config import CHECKPOINT, STATE_FILE
from pipeline.training import final_tmp, swap_in_final_model

log = logging.getLogger("pipeline.ppo")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a same-shaped tensor from every process."""
    if not _distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def own_checkpoints(output_dir: str) -> list[tuple[int, Path]]:
    """The complete checkpoints this stage wrote (a `checkpoint-N` without its state file is not touched)."""
    return sorted((int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
                  if (m := CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file())  # fmt: skip


def latest_checkpoint(output_dir: str) -> Path | None:
    found = own_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    accelerator, output_dir: str, update: int, state: dict, limit: int | None, main: bool
) -> None:
    """The whole training state (models, optimizer, scheduler, RNGs, β, history), complete or absent."""
    final = Path(output_dir) / f"checkpoint-{update}"
    tmp = Path(output_dir) / f".checkpoint-{update}.tmp"
    if main and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    accelerator.save_state(str(tmp))
    barrier()
    if main:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "update": update}))
        if final.exists():
            if not (final / STATE_FILE).is_file():
                raise PipelineError(f"{final} was not written by this stage and this run would save over it; "
                                    "move it out of output_dir and resume")  # fmt: skip
            shutil.rmtree(final)
        os.replace(tmp, final)
        if limit:
            for _, path in own_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(path, ignore_errors=True)
    barrier()


def save_policy(accelerator, model, tokenizer, output_dir: str, main: bool) -> None:
    """The policy (or its LoRA adapter) and tokenizer as a plain HF folder, written aside and moved in."""
    state = accelerator.get_state_dict(model)
    if main:
        tmp = final_tmp(output_dir)
        policy = accelerator.unwrap_model(model).policy
        policy_state = {k[len("policy.") :]: v for k, v in state.items() if k.startswith("policy.")}
        policy.save_pretrained(tmp, state_dict=policy_state)
        tokenizer.padding_side = "right"  # what training stages expect when they load it
        tokenizer.save_pretrained(tmp)
        swap_in_final_model(tmp, output_dir)
    barrier()
