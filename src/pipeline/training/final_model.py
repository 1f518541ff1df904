"""The final model: saved into an empty folder and swapped in whole; LoRA adapters merged on request."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from pipeline.runinfo import is_main_process

logger = logging.getLogger("pipeline.training")


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


FINAL_RECORD = ".pipeline_final_model.json"  # the entries of output_dir that the last final save wrote


# what a final save of an earlier version may have left (those folders have no record)
_MODEL_ENTRIES = ("config.json", "generation_config.json", "adapter_config.json", "adapter_model.safetensors",
                  "adapter_model.bin", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                  "vocab.json", "merges.txt", "added_tokens.json", "README.md", "training_args.bin", "adapter")  # fmt: skip


def final_tmp(output_dir: str | os.PathLike) -> Path:
    """The empty folder a final model is assembled in (what a killed save left there is cleared)."""
    tmp = Path(output_dir) / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def swap_in_final_model(tmp: Path, output_dir: str | os.PathLike) -> None:
    """Replace the final model in `output_dir` by the one assembled in `tmp`: every entry of the previous
    final save (its record, or the usual model files for older folders) moves aside, the new entries move
    in, then the old ones are deleted. No file of an older model (an `adapter_config.json` next to a new
    full model) survives, and nothing else in `output_dir` (run.json, checkpoints) is touched."""
    import json

    out = Path(output_dir)
    record = out / FINAL_RECORD
    try:
        previous = json.loads(record.read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        previous = [*_MODEL_ENTRIES, *(p.name for p in out.glob("model-*-of-*.safetensors"))]
    aside = out / ".final.old"
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    record.unlink(missing_ok=True)  # from here until the new record, the folder holds no claimed model
    for name in previous:
        if (out / name).exists() and not name.startswith("."):
            os.replace(out / name, aside / name)
    entries = sorted(p.name for p in tmp.iterdir())
    for name in entries:
        os.replace(tmp / name, out / name)
    record_tmp = out / f".{FINAL_RECORD}.tmp"
    record_tmp.write_text(json.dumps({"entries": entries}) + "\n")
    os.replace(record_tmp, record)
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def save_final_model(trainer, output_dir: str, merge_lora: bool = False) -> None:
    """Save model + tokenizer into an empty temporary folder, then swap it in (`swap_in_final_model`).

    All ranks must call `save_model` (DeepSpeed/FSDP gather weights there); only the main rank moves files.
    `merge_lora`: a LoRA adapter is merged into its base first, so the folder is a plain model (the adapter
    goes to `adapter/`).
    """
    if is_main_process():
        final_tmp(output_dir)
    trainer.accelerator.wait_for_everyone()
    tmp = Path(output_dir) / ".final.tmp"
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if is_main_process():
        if merge_lora and not merge_saved_adapter(tmp):
            logger.warning("merge_lora: no LoRA adapter to merge (use_peft is off); saved the model as it is")
        swap_in_final_model(tmp, output_dir)
    trainer.accelerator.wait_for_everyone()
