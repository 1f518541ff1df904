"""`pipeline ips`: alignment with stored logps, filters, refusals, the launcher script."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.stages import ips, logp, prepare
from pipeline.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 128
COMMON = ["--bf16", "false", "--gradient_checkpointing", "false", "--dtype", "float32", "--report_to", "none",
          "--eval_strategy", "no", "--save_strategy", "no", "--per_device_train_batch_size", "8"]  # fmt: skip


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir, task_data):
    """prepare (with the model's tokenizer) + logp (the model as reference) on the synthetic code-RL rows."""
    root = tmp_path_factory.mktemp("ips")
    prepare.main(["--data_path", task_data["coderl_train"], "--output_dir", str(root / "prepared"),
                  "--tokenizer_name_or_path", str(tiny_model_dir), "--eval_fraction", "0.1"])  # fmt: skip
    logp.main(["--data_path", str(root / "prepared"), "--model_name_or_path", str(tiny_model_dir),
               "--max_length", str(MAX_LENGTH)])  # fmt: skip
    return root


def run_ips(chain, model, out, *flags):
    return ips.main(["--data_path", str(chain / "prepared"), "--model_name_or_path", str(model),
                     "--output_dir", str(out), "--max_length", str(MAX_LENGTH), *COMMON, *flags])  # fmt: skip


def train_rewards(chain):
    files = sorted((chain / "prepared" / "rl").glob("train-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).column("reward").to_pylist()


def test_policy_equals_reference_at_start(tmp_path, chain, tiny_model_dir):
    # same tokenization in both stages: before any update ρ = 1 and KL = 0 on every token
    result = run_ips(chain, tiny_model_dir, tmp_path / "o", "--learning_rate", "0", "--max_steps", "2",
                     "--logging_steps", "1")  # fmt: skip
    first = result["log_history"][0]
    assert first["ips/rho_mean"] == pytest.approx(1.0, abs=1e-5)
    assert first["ips/rho_max"] == pytest.approx(1.0, abs=1e-5)
    assert abs(first["ips/kl"]) < 1e-5 and first["ips/clipped_frac"] == 0.0
    assert result["train_used_rows"] == len(train_rewards(chain))  # no silent row limit
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_training_moves_the_policy_and_logs_metrics(tmp_path, chain, tiny_model_dir):
    result = run_ips(chain, tiny_model_dir, tmp_path / "o", "--learning_rate", "3e-3", "--max_steps", "12",
                     "--logging_steps", "4")  # fmt: skip
    logs = [h for h in result["log_history"] if "ips/kl" in h]
    assert len(logs) == 3
    for key in ("ips/policy_loss_pos", "ips/policy_loss_neg", "ips/rho_mean", "ips/rho_max", "ips/clipped_frac",
                "ips/reward_mean", "ips/response_tokens_per_s"):  # fmt: skip
        assert key in logs[-1], key
    assert logs[-1]["ips/rho_max"] > 1.0 + 1e-3  # the policy moved away from the reference
    info = json.loads((tmp_path / "o" / "run.json").read_text())
    assert info["status"] == "completed" and info["config"]["loss_type"] == "ips"


def test_posonly_trains_only_on_rows_above_threshold(tmp_path, chain, tiny_model_dir):
    rewards = train_rewards(chain)
    result = run_ips(chain, tiny_model_dir, tmp_path / "o", "--datafilter", "posonly", "--max_steps", "6",
                     "--logging_steps", "1", "--learning_rate", "1e-3")  # fmt: skip
    assert result["train_used_rows"] == sum(r > 0.75 for r in rewards) < len(rewards)
    assert result["train_dropped_posonly"] == sum(r <= 0.75 for r in rewards)
    batch_means = [h["ips/reward_mean"] for h in result["log_history"] if "ips/reward_mean" in h]
    assert batch_means and min(batch_means) > 0.75  # every batch held only rows above the threshold


def test_mismatched_logps_are_refused_before_training(tmp_path, chain, tiny_model_dir):
    out = tmp_path / "o"
    with pytest.raises(PipelineError, match=r"another max_length \(128 there, 64 here\)"):
        ips.main(["--data_path", str(chain / "prepared"), "--model_name_or_path", str(tiny_model_dir),
                  "--output_dir", str(out), "--max_length", "64", *COMMON])  # fmt: skip
    other = make_tiny_model(tmp_path / "other", seed=1)  # same tokenizer, other weights
    with pytest.raises(PipelineError, match="another reference model"):
        run_ips(chain, tiny_model_dir, out, "--ref_model_name_or_path", str(other))
    other_tok = make_tiny_model(tmp_path / "other_tok", vocab_size=700)
    with pytest.raises(PipelineError, match="another tokenizer"):
        run_ips(chain, other_tok, out)
    assert not out.exists()  # refused before anything was written


def test_rows_without_logps(tmp_path, chain, tiny_model_dir):
    partial = tmp_path / "partial_logp"
    shutil.copytree(f"{chain / 'prepared'}_ref_logp", partial)
    dropped = pq.read_table(partial / "train-part-00000.parquet")
    kept = dropped.slice(5)
    pq.write_table(kept, partial / "train-part-00000.parquet")
    with pytest.raises(PipelineError, match="5 of .* rows have no stored logps"):
        run_ips(chain, tiny_model_dir, tmp_path / "o", "--logp_dir", str(partial))
    result = run_ips(chain, tiny_model_dir, tmp_path / "o", "--logp_dir", str(partial), "--skip_missing", "true",
                     "--max_steps", "1")  # fmt: skip
    assert result["train_skipped_missing_logps"] == 5


def test_train_script_runs_on_cpu(tmp_path, chain, tiny_model_dir):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "gpu": "0",
           "ml": str(MAX_LENGTH), "bsz": "4", "gacc": "1", "lr": "1000", "out": str(tmp_path / "o")}  # fmt: skip
    cmd = ["bash", str(REPO / "scripts/train.sh"), str(chain / "prepared"), str(tiny_model_dir), "ref", "reward",
           "unprocessed_response", "posonly", "--max_steps", "2", "--save_strategy", "no"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "o" / "run.json").read_text())
    assert (
        info["config"]["learning_rate"] == pytest.approx(1e-3) and info["config"]["datafilter"] == "posonly"
    )
    assert info["metrics"]["global_step"] == 2


def test_padding_free_batches_give_the_same_loss(tmp_path, chain, tiny_model_dir):
    runs = {}
    for mode in ("false", "true"):
        result = run_ips(chain, tiny_model_dir, tmp_path / mode, "--padding_free", mode, "--learning_rate", "1e-3",
                         "--max_steps", "3", "--logging_steps", "1", "--seed", "3")  # fmt: skip
        runs[mode] = [h for h in result["log_history"] if "loss" in h and "ips/kl" in h]
    assert len(runs["true"]) == 3
    for padded, flat in zip(runs["false"], runs["true"], strict=True):
        assert flat["loss"] == pytest.approx(padded["loss"], abs=1e-4)
        assert flat["ips/kl"] == pytest.approx(padded["ips/kl"], abs=1e-5)
    with pytest.raises(PipelineError, match="use padding_free"):
        run_ips(chain, tiny_model_dir, tmp_path / "packed", "--packing", "true")
