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
