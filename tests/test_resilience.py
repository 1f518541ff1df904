"""Resume, complete-or-absent checkpoints, out-of-memory back-off, dry runs and merged LoRA outputs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from trl import SFTTrainer

from pipeline.errors import PipelineError
from pipeline.stages import sft
from pipeline.training import COMPLETE_MARKER, checkpoint_folders

# fp32 on the CPU, a constant learning rate, within one epoch of 32 rows: every step's loss is a
# deterministic function of the rows it sees (the loss is normalised by the step's token count, so it does
# not depend on how the step's rows are split into micro-batches)
COMMON = ["--bf16", "false", "--gradient_checkpointing", "false", "--dtype", "float32", "--report_to", "none",
          "--eval_strategy", "no", "--max_length", "96", "--seed", "0", "--logging_steps", "1",
          "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--max_train_samples", "32"]  # fmt: skip


def run_sft(model, data, out, *flags):
    return sft.main(["--model_name_or_path", str(model), "--train_data", data["sft_train"], "--output_dir", str(out),
                     *COMMON, *flags])  # fmt: skip


def step_losses(result) -> list[float]:
    return [h["loss"] for h in result["log_history"] if "loss" in h]


def oom_after(monkeypatch, step: int, micro_batch: int, rows_above: int):
    """Make SFTTrainer.training_step raise CUDA's out-of-memory error once: on micro-batch `micro_batch`
    (1-based) of optimizer step `step + 1`, when the micro-batch holds more than `rows_above` rows."""
    original = SFTTrainer.training_step
    calls: dict[int, int] = {}
    fired = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        at = self.state.global_step
        calls[at] = calls.get(at, 0) + 1
        if at == step and calls[at] == micro_batch and len(inputs["input_ids"]) > rows_above and not fired:
            fired.append(at)
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)"
            )
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(SFTTrainer, "training_step", training_step)
    return fired


def test_oom_back_off_keeps_the_global_batch_and_the_loss_curve(
    tmp_path, tiny_model_dir, task_data, monkeypatch
):
    # uninterrupted: 2 rows x 4 micro-batches per step
    reference = run_sft(tiny_model_dir, task_data, tmp_path / "ref", "--max_steps", "3", "--save_strategy", "no",
                        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4")  # fmt: skip
    # 4 rows x 2, out of memory in the second micro-batch of step 2 (after one backward of that step)
    fired = oom_after(monkeypatch, step=1, micro_batch=2, rows_above=2)
    backed = run_sft(tiny_model_dir, task_data, tmp_path / "oom", "--max_steps", "3", "--save_strategy", "no",
                     "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2")  # fmt: skip
    assert fired == [1]
    [event] = backed["oom_backoffs"]
    assert event["step"] == 2 and "out of memory" in event["error"]
    micro, accum = event["per_device_train_batch_size"], event["gradient_accumulation_steps"]
    assert (micro, accum) == (2, 4) and micro * accum == 4 * 2  # global batch unchanged
    assert [h["step"] for h in backed["log_history"] if "loss" in h] == [1, 2, 3]  # step 2 retried once
    assert backed["global_step"] == 3
    # the same rows per step, so the same losses: they differ by float32 rounding (~5e-7 here) only
    assert step_losses(backed) == pytest.approx(step_losses(reference), abs=1e-6)
    info = json.loads((tmp_path / "oom" / "run.json").read_text())
    assert info["status"] == "completed" and info["metrics"]["oom_backoffs"][0]["step"] == 2
    assert not (tmp_path / "oom" / ".oom-backoff").exists()  # the retry's saved state is cleaned up


def test_oom_with_several_processes_restarts_every_process_at_the_smaller_split(
    tmp_path, tiny_model_dir, task_data, monkeypatch
):
    from transformers import TrainingArguments

    reference = run_sft(tiny_model_dir, task_data, tmp_path / "ref", "--max_steps", "3", "--save_strategy", "no",
                        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4")  # fmt: skip
    # as one of two processes: the others wait in a collective, so this attempt stops (checkpoint at step 1)
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    fired = oom_after(monkeypatch, step=1, micro_batch=2, rows_above=2)
    flags = ["--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", "--per_device_train_batch_size",
             "4", "--gradient_accumulation_steps", "2"]  # fmt: skip
    with pytest.raises(PipelineError, match=r"one of 2 processes; run the same command again.*per_device_train"
                       r"_batch_size 2 x gradient_accumulation_steps 4 \(global batch unchanged"):  # fmt: skip
        run_sft(tiny_model_dir, task_data, tmp_path / "oom", *flags)
    assert fired == [1] and (tmp_path / "oom" / "oom_backoff.json").is_file()
    # the same command again: every process reads the recorded split, resumes from step 1 and finishes
    resumed = run_sft(tiny_model_dir, task_data, tmp_path / "oom", *flags)
    assert resumed["resumed_from"].endswith("checkpoint-1")
    assert resumed["per_device_train_batch_size"] == 2 and resumed["gradient_accumulation_steps"] == 4
    assert step_losses(resumed)[-2:] == pytest.approx(step_losses(reference)[1:], abs=1e-6)
    assert not (tmp_path / "oom" / "oom_backoff.json").exists()


def test_oom_at_micro_batch_one_gives_up_in_one_line(tmp_path, tiny_model_dir, task_data, monkeypatch):
    def always_oom(self, model, inputs, num_items_in_batch=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(SFTTrainer, "training_step", always_oom)
    with pytest.raises(PipelineError) as err:
        run_sft(tiny_model_dir, task_data, tmp_path / "o", "--max_steps", "2", "--save_strategy", "no",
                "--per_device_train_batch_size", "2")  # fmt: skip
    message = str(err.value)
    assert (
        "\n" not in message
        and "per_device_train_batch_size 1" in message
        and "nothing left to shrink" in message
    )
    assert json.loads((tmp_path / "o" / "run.json").read_text())["status"] == "failed"


def test_oom_in_the_optimizer_step_is_not_retried(tmp_path, tiny_model_dir, task_data, monkeypatch):
    def oom_step(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(torch.optim.AdamW, "step", oom_step)
    with pytest.raises(PipelineError, match="in the optimizer step"):
        run_sft(tiny_model_dir, task_data, tmp_path / "o", "--max_steps", "1", "--save_strategy", "no",
                "--per_device_train_batch_size", "8")  # fmt: skip


class Killed(Exception):
    pass


def run_ips(model, workspace, out, *flags):
    from pipeline.stages import ips

    # the logps were computed at max_length 256; IPS has no max_train_samples (it trains on every prepared row)
    return ips.main(["--model_name_or_path", str(model), "--data_path", str(workspace / "runs/demo/prepare"),
                     "--logp_dir", str(workspace / "runs/demo/logp"), "--output_dir", str(out), *COMMON[:-2],
                     "--max_length", "256", *flags])  # fmt: skip


@pytest.mark.parametrize("stage", ["sft", "ips"])
def test_killed_run_resumes_to_the_same_losses(
    stage, tmp_path, tiny_model_dir, task_data, monkeypatch, request
):
    if stage == "sft":

        def run(out, *flags):
            return run_sft(tiny_model_dir, task_data, out, *flags)
    else:  # IPSTrainer subclasses SFTTrainer: the same patch kills it
        workspace = request.getfixturevalue("recipe_workspace")

        def run(out, *flags):
            return run_ips(tiny_model_dir, workspace, out, *flags)

    flags = [
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",
    ]
    whole = run(tmp_path / "whole", *flags)

    # killed while writing checkpoint-3: the model files are on disk, the rest (and the marker) never come
    out = tmp_path / "run"
    original = SFTTrainer._save_checkpoint

    def save_then_die(self, model, trial):
        if self.state.global_step == 3:
            self.save_model(str(out / "checkpoint-3"), _internal_call=True)
            raise Killed
        return original(self, model, trial)

    monkeypatch.setattr(SFTTrainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run(out, *flags)
    monkeypatch.undo()
    assert [n for n, _ in checkpoint_folders(out)] == [1, 2, 3]
    assert (
        not (out / "checkpoint-3" / COMPLETE_MARKER).exists()
        and (out / "checkpoint-2" / COMPLETE_MARKER).exists()
    )
    assert json.loads((out / "run.json").read_text())["status"] == "failed"

    resumed = run(out, *flags)  # the same command again: resumes at step 2 of 4
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert [h["step"] for h in resumed["log_history"] if "loss" in h] == [1, 2, 3, 4]
    assert step_losses(resumed) == pytest.approx(step_losses(whole), abs=1e-6)
    assert all((p / COMPLETE_MARKER).is_file() for _, p in checkpoint_folders(out))

    # `resume_from_checkpoint: false` starts afresh, and the old checkpoints go (none can be resumed later)
    fresh = run(out, "--max_steps", "1", "--per_device_train_batch_size", "4", "--save_strategy", "no",
                "--resume_from_checkpoint", "false")  # fmt: skip
    assert fresh["resumed_from"] is None and fresh["global_step"] == 1 and checkpoint_folders(out) == []


def test_resume_false_in_a_recipe_is_accepted():
    from pipeline.configs import check_value

    assert check_value("resume_from_checkpoint", str | None, False) is None  # YAML `false`
    assert check_value("output_dir", str | None, False) is not None


# ------------------------------------------------------------------------------------------------ merged LoRA


def test_merge_lora_saves_a_plain_model(tmp_path, tiny_model_dir, task_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    run_sft(tiny_model_dir, task_data, out, "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--save_strategy", "no", "--use_peft", "true", "--lora_target_modules", "all-linear",
            "--learning_rate", "1e-2", "--merge_lora", "true")  # fmt: skip
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists() and (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # no peft, no pipeline code
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[5, 17, 99, 300, 42, 7]])
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out / "adapter").eval()  # base + the kept adapter
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, before, atol=1e-4)  # the adapter was trained


# ------------------------------------------------------------------------------------------------ dry run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recipe_workspace(tmp_path_factory, tiny_model_dir):
    """A folder holding the data the cluster recipes name (their relative paths), but none of their models."""
    from pipeline.stages import logp, prepare
    from pipeline.tasks.synthetic import export_task

    root = tmp_path_factory.mktemp("workspace")
    data = export_task(root / "runs/qwen/data", num_problems=40, seed=0, responses_per_problem=2)
    prepare.main(["--data_path", data["coderl_train"], "--output_dir", str(root / "data/prepared"),
                  "--tokenizer_name_or_path", str(tiny_model_dir), "--eval_fraction", "0.2"])  # fmt: skip
    shutil.copytree(root / "data/prepared", root / "runs/demo/prepare")
    logp.main(["--data_path", str(root / "runs/demo/prepare"), "--model_name_or_path", str(tiny_model_dir),
               "--max_length", "256", "--output_dir", str(root / "runs/demo/logp")])  # fmt: skip
    return root


DRY_RUNS = {  # stage: recipe (the qwen ones name hub ids or cluster folders that do not exist here)
    "sft": "qwen/sft.yaml",
    "rm": "qwen/rm.yaml",
    "dpo": "qwen/dpo.yaml",
    "grpo": "qwen/grpo.yaml",
    "ppo": "qwen/ppo.yaml",
    "ips": "demo/ips.yaml",
}  # fmt: skip  (rloo runs through the same code as grpo, `run_online_rl`, and takes 15 s more here)


@pytest.mark.parametrize("stage", list(DRY_RUNS))
def test_dry_run_of_a_cluster_recipe(stage, recipe_workspace, monkeypatch):
    import importlib

    import yaml

    recipe = REPO / "recipes" / DRY_RUNS[stage]
    real = yaml.safe_load(recipe.read_text())
    assert not Path(recipe_workspace, real["model_name_or_path"]).exists()
    monkeypatch.chdir(recipe_workspace)
    importlib.import_module(f"pipeline.stages.{stage}").main(["--config", str(recipe), "--dry_run", "true"])
    out = recipe_workspace / "dry_runs" / real["output_dir"]  # never the real run's folder
    info = json.loads((out / "run.json").read_text())
    config, metrics = info["config"], info["metrics"]
    assert info["status"] == "completed" and config["dry_run"] is True
    assert config["model_name_or_path"] == str(Path("dry_runs", real["output_dir"], "dry_run_model"))
    assert config["bf16"] is False and config["use_cpu"] is True and config["report_to"] in ([], ["none"])
    assert metrics.get("global_step", metrics.get("updates")) == 2
    assert not (recipe_workspace / real["output_dir"]).exists()


def test_grpo_oom_back_off_keeps_the_generation_batch(
    tmp_path, tiny_model_dir, recipe_workspace, monkeypatch
):
    from trl import GRPOTrainer

    from pipeline.stages import grpo

    original = GRPOTrainer.training_step
    seen = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        seen.append(
            (self.state.global_step, self.args.per_device_train_batch_size, self.args.steps_per_generation)
        )
        if self.state.global_step == 1 and self.args.per_device_train_batch_size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(GRPOTrainer, "training_step", training_step)
    result = grpo.main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "g"),
                        "--train_data", str(recipe_workspace / "runs/qwen/data/sft_train.parquet"),
                        "--synthetic_task_seed", "0", "--max_train_samples", "16", "--num_generations", "4",
                        "--max_completion_length", "16", "--per_device_train_batch_size", "8", "--max_steps", "2",
                        "--beta", "0", "--logging_steps", "1", "--bf16", "false", "--report_to", "none",
                        "--gradient_checkpointing", "false", "--save_strategy", "no", "--reward_workers", "2"])  # fmt: skip
    [event] = result["oom_backoffs"]
    assert (event["step"], event["per_device_train_batch_size"], event["gradient_accumulation_steps"]) == (
        2,
        4,
        2,
    )
    # one generation batch of 8 completions (2 prompts x 4) per optimizer step, before and after
    assert seen[0] == (0, 8, 1) and seen[-1] == (1, 4, 2)
    assert result["global_step"] == 2 and [h["step"] for h in result["log_history"] if "loss" in h] == [1, 2]
