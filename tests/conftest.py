"""Shared fixtures: everything is built locally (no hub), once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")  # tests that exercise W&B switch it to offline themselves
os.environ.pop("WANDB_API_KEY", None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from pipeline.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def task_data(tmp_path_factory):
    """The synthetic task exported in every shape (dict name -> parquet path)."""
    from pipeline.tasks.synthetic import export_task

    return export_task(tmp_path_factory.mktemp("task"), num_problems=240, seed=0, responses_per_problem=1)


SFT_COMMON = ["--bf16", "false", "--gradient_checkpointing", "false", "--dtype", "float32", "--report_to", "none",
              "--eval_strategy", "no", "--save_strategy", "no", "--per_device_train_batch_size", "16",
              "--max_length", "256", "--seed", "0"]  # fmt: skip
SFT_NUM_PROBLEMS = 520


@pytest.fixture(scope="session")
def sft_setup(tmp_path_factory):
    """A 4-layer tiny model SFT'd for 200 steps on the synthetic task (it then solves some held-out
    problems), with the task's exported files: {"model": sft dir, "data": {name: parquet}, "held_out": [...]}.
    Built once (~40 s) and shared by the stages that start from an SFT model (IPS, DPO, GRPO, RLOO)."""
    from pipeline.stages import sft
    from pipeline.tasks.synthetic import export_task, generate_problems, split_problems
    from pipeline.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("sft_setup")
    model = make_tiny_model(root / "tiny", seed=0, hidden_size=128, num_layers=4, intermediate_size=512)
    data = export_task(root / "data", num_problems=SFT_NUM_PROBLEMS, seed=0, responses_per_problem=2)
    sft.main(["--model_name_or_path", str(model), "--train_data", data["sft_train"], "--output_dir",
              str(root / "sft"), "--max_steps", "200", "--learning_rate", "2e-3", "--assistant_only_loss",
              "true", *SFT_COMMON])  # fmt: skip
    _, held_out = split_problems(generate_problems(SFT_NUM_PROBLEMS, 0), 0.1, 0)
    return {"model": str(root / "sft"), "data": data, "held_out": held_out, "common": SFT_COMMON}
