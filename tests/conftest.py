"""Shared fixtures: everything is built locally (no hub), once per test session."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PIPELINE_CACHE_DIR", tempfile.mkdtemp(prefix="pipeline-cache-"))  # not the home folder
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
def sft_task(tmp_path_factory):
    """The random 4-layer tiny model the SFT fixtures start from, and the synthetic task's 520 problems exported
    in every shape: {"tiny": model dir, "data": {name: parquet}, "train_problems": [the 468 others],
    "held_out": [the 52 held-out problems]}."""
    from pipeline.tasks.synthetic import export_task, generate_problems, split_problems
    from pipeline.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("sft_task")
    model = make_tiny_model(root / "tiny", seed=0, hidden_size=128, num_layers=4, intermediate_size=512)
    data = export_task(root / "data", num_problems=SFT_NUM_PROBLEMS, seed=0, responses_per_problem=2)
    train, held_out = split_problems(generate_problems(SFT_NUM_PROBLEMS, 0), 0.1, 0)
    return {"tiny": str(model), "data": data, "train_problems": train, "held_out": held_out}


def _sft(sft_task, out, *flags) -> dict:
    from pipeline.stages import sft

    sft.main(["--model_name_or_path", sft_task["tiny"], "--train_data", sft_task["data"]["sft_train"],
              "--output_dir", str(out), "--learning_rate", "2e-3", "--assistant_only_loss", "true", *SFT_COMMON,
              *flags])  # fmt: skip
    return {
        "model": str(out),
        "data": sft_task["data"],
        "train_problems": sft_task["train_problems"],
        "held_out": sft_task["held_out"],
        "common": SFT_COMMON,
    }


@pytest.fixture(scope="session")
def sft_setup(sft_task, tmp_path_factory):
    """The 4-layer tiny model SFT'd for 200 steps at lr 2e-3 with TRL's default schedule (linear decay, no
    warmup): deliberately short of the demo's SFT, it solves 0.46 of the held-out problems (greedy), which
    leaves room for the stages that must show a gain from it (IPS, GRPO, PPO, RLOO).
    {"model": sft dir, "data": {name: parquet}, "held_out": [...], "common": SFT_COMMON}; built once (~20 s)."""
    return _sft(sft_task, tmp_path_factory.mktemp("sft_setup") / "sft", "--max_steps", "200")


@pytest.fixture(scope="session")
def sft_demo_setup(sft_task, tmp_path_factory):
    """The same model SFT'd with the demo's recipe (src/pipeline/demo.yaml: 240 steps, cosine schedule, 5%
    warmup): a well-trained SFT model (held-out greedy pass@1 0.83 with seed 0, 0.81 with seed 1), the start
    of DPO's no-regression check. Same keys as `sft_setup`; built once (~25 s)."""
    return _sft(sft_task, tmp_path_factory.mktemp("sft_demo_setup") / "sft", "--max_steps", "240",
                "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05")  # fmt: skip
