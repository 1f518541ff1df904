"""run.json content, log files and tracking safety."""

import json
import os
import subprocess
from types import SimpleNamespace

from trl import ModelConfig

from pipeline import runinfo
from pipeline.configs import DataArguments


def test_run_json_records_config_seed_versions_host_and_times(tmp_path, monkeypatch):
    data = DataArguments(train_data="x.parquet")
    model = ModelConfig(model_name_or_path="m", lora_r=4)
    run = runinfo.RunInfo(tmp_path, "sft", (data, model), seed=123)
    first = json.loads((tmp_path / "run.json").read_text())
    assert first["status"] == "running" and first["end"] is None
    run.finish({"eval_loss": 1.5})
    info = runinfo.read_run_info(tmp_path)
    assert info["stage"] == "sft" and info["seed"] == 123 and info["status"] == "completed"
    assert info["config"]["train_data"] == "x.parquet" and info["config"]["lora_r"] == 4
    assert info["metrics"] == {"eval_loss": 1.5}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "pipeline"):
        assert info["packages"][pkg], pkg
    assert info["host"]["hostname"] and info["host"]["cpu_count"] >= 1
    assert info["start"] <= info["end"]
    assert set(info["git"]) == {"commit", "dirty"}
    assert not list(tmp_path.glob(".run.json.tmp*"))


def test_git_state_reports_commit_and_dirty_flag(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    clean = runinfo.git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "f.txt").write_text("b")
    assert runinfo.git_state(tmp_path)["dirty"] is True
    assert runinfo.git_state("/")["commit"] is None  # not a checkout: recorded as unknown, no crash


def test_secrets_are_not_recorded(tmp_path):
    cfg = SimpleNamespace()
    from dataclasses import make_dataclass

    cls = make_dataclass("C", [("hub_token", str), ("lr", float)])
    cfg = cls(hub_token="hf_SECRET123", lr=0.1)
    runinfo.RunInfo(tmp_path, "x", (cfg,), seed=0).finish()
    text = (tmp_path / "run.json").read_text()
    assert "hf_SECRET123" not in text and '"lr": 0.1' in text


def test_wandb_goes_offline_into_output_dir_without_key(tmp_path, monkeypatch):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no `wandb login` either
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("_PIPELINE_WANDB_DIR", raising=False)
    runinfo.setup_tracking(["wandb"], tmp_path / "run1")
    assert os.environ["WANDB_MODE"] == "offline"
    assert os.environ["WANDB_DIR"] == str((tmp_path / "run1").resolve())
    # a second in-process run moves to its own folder
    runinfo.setup_tracking("wandb", tmp_path / "run2")
    assert os.environ["WANDB_DIR"] == str((tmp_path / "run2").resolve())


def test_wandb_login_is_honoured(tmp_path, monkeypatch):
    """`wandb login` writes the key to ~/.netrc: that counts as logged in, without WANDB_API_KEY."""
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    runinfo.setup_tracking("wandb", tmp_path / "run")
    assert "WANDB_MODE" not in os.environ
    netrc_file.write_text("machine example.com\n  login a\n  password b\n")
    runinfo.setup_tracking("wandb", tmp_path / "run")
    assert os.environ["WANDB_MODE"] == "offline"


def test_wandb_online_when_key_present_and_untouched_when_not_reporting(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    runinfo.setup_tracking("wandb", tmp_path)
    assert "WANDB_MODE" not in os.environ
    monkeypatch.delenv("WANDB_API_KEY")
    runinfo.setup_tracking("none", tmp_path)
    assert "WANDB_MODE" not in os.environ


def test_log_file_per_run(tmp_path):
    import logging

    first = runinfo.setup_logging(tmp_path / "a")
    logging.getLogger("pipeline.test").info("into a")
    second = runinfo.setup_logging(tmp_path / "b")
    logging.getLogger("pipeline.test").info("into b")
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert "into a" in first.read_text() and "into b" not in first.read_text()
    assert "into b" in second.read_text()
