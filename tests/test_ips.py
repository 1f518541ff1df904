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


def test_train_script_refusal_is_one_last_line(tmp_path, chain, tiny_model_dir):
    """`gpu=8` copied from a GPU node's job: one line says so and the CPU trial runs. A stage's refusal (logps
    made at another max_length) is then the last line of the output, once, with no traceback, status 2.
    (A successful train.sh run: `test_scripts_take_the_raw_logged_parquet`.)"""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "gpu": "8", "ds": "zero3",
           "ml": str(2 * MAX_LENGTH), "bsz": "4", "gacc": "1", "out": str(tmp_path / "o")}  # fmt: skip
    env.pop("WORKER_NUM", None)
    cmd = ["bash", str(REPO / "scripts/train.sh"), str(chain / "prepared"), str(tiny_model_dir), "ref", "reward",
           "unprocessed_response", "posonly", "--max_steps", "2", "--save_strategy", "no"]  # fmt: skip
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert "train.sh: gpu=8 asked, but no GPU is visible here: running the CPU trial" in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert lines[-1].startswith("pipeline ips: error: ") and "max_length" in lines[-1], lines[-5:]
    assert sum("pipeline ips: error:" in line for line in lines) == 1
    assert not (tmp_path / "o" / "run.json").exists()


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


# ------------------------------------------------------------------------------------------ the logp contract


def store_copy(chain, tmp_path, name="store"):
    copy = tmp_path / name
    shutil.copytree(f"{chain / 'prepared'}_ref_logp", copy)
    return copy


def rewrite_logps(store, change):
    """Apply `change(list of per-token logps) -> list` to every row of every part file (manifest untouched)."""
    for part in store.glob("*-part-*.parquet"):
        table = pq.read_table(part)
        values = pa.array([change(v) for v in table.column("logps").to_pylist()], pa.list_(pa.float32()))
        pq.write_table(table.set_column(table.schema.get_field_index("logps"), "logps", values), part)


def test_logps_of_another_dtype_are_refused_unless_allowed(tmp_path, chain, tiny_model_dir):
    bf16 = tmp_path / "bf16_logp"
    logp.main(["--data_path", str(chain / "prepared"), "--model_name_or_path", str(tiny_model_dir),
               "--max_length", str(MAX_LENGTH), "--dtype", "bfloat16", "--output_dir", str(bf16)])  # fmt: skip
    out = tmp_path / "o"
    with pytest.raises(
        PipelineError, match=r"another dtype \(bfloat16 there, float32 here\).*--dtype float32"
    ):
        run_ips(chain, tiny_model_dir, out, "--logp_dir", str(bf16))
    assert not out.exists()
    result = run_ips(chain, tiny_model_dir, out, "--logp_dir", str(bf16), "--allow_logp_dtype_mismatch", "true",
                     "--learning_rate", "0", "--max_steps", "1")  # fmt: skip
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["allow_logp_dtype_mismatch"] is True
    assert info["metrics"]["logp_contract"]["dtype_mismatch_allowed"] == "bfloat16 there, float32 here"
    # bf16 rounding shows at step 0, well under the threshold (0.05): on this model 0.01 on average
    mismatch = result["logp_mismatch"]
    print("bf16 logps, fp32 policy, step 0:", mismatch)
    assert 1e-4 < mismatch["mean_abs_log_ratio"] < 0.05 and mismatch["starts_from_reference"] is True


def test_logps_of_re_prepared_data_are_refused(tmp_path, chain, tiny_model_dir, task_data):
    # the same rows prepared again with other responses of the same uids (e.g. another cleaning)
    table = pq.read_table(task_data["coderl_train"])
    responses = [r.replace("return", "return ") for r in table.column("unprocessed_response").to_pylist()]
    column = table.schema.get_field_index("unprocessed_response")
    pq.write_table(
        table.set_column(column, "unprocessed_response", pa.array(responses)), tmp_path / "new.parquet"
    )
    again = tmp_path / "prepared"
    prepare.main(["--data_path", str(tmp_path / "new.parquet"), "--output_dir", str(again),
                  "--tokenizer_name_or_path", str(tiny_model_dir), "--eval_fraction", "0.1"])  # fmt: skip
    out = tmp_path / "o"
    with pytest.raises(PipelineError, match=r"another prepared data \(prepare manifest \w+ there, \w+ here; differs "
                                            r"in config, .*sources\).*pipeline logp --data_path"):  # fmt: skip
        ips.main(["--data_path", str(again), "--logp_dir", f"{chain / 'prepared'}_ref_logp", "--model_name_or_path",
                  str(tiny_model_dir), "--output_dir", str(out), "--max_length", str(MAX_LENGTH), *COMMON])  # fmt: skip
    assert not out.exists()


def test_non_finite_logps_are_refused(tmp_path, chain, tiny_model_dir):
    store = store_copy(chain, tmp_path)
    part = sorted(store.glob("train-part-*.parquet"))[0]
    first_uid = pq.read_table(part).column("uid")[0].as_py()
    table = pq.read_table(part)
    logps = table.column("logps").to_pylist()
    logps[0][1] = float("nan")
    logps[3][0] = float("-inf")
    pq.write_table(table.set_column(1, "logps", pa.array(logps, pa.list_(pa.float32()))), part)
    out = tmp_path / "o"
    with pytest.raises(
        PipelineError, match=rf"2 rows hold logps that are not finite \(NaN or inf; first uid '{first_uid}'"
    ):
        run_ips(chain, tiny_model_dir, out, "--logp_dir", str(store))
    assert not out.exists()


def test_logp_stage_refuses_a_model_that_gives_non_finite_logps(tmp_path, chain, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # a broken checkpoint
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(broken)
    out = tmp_path / "logp"
    with pytest.raises(
        PipelineError, match=r"logp: \d+ of \d+ rows of train part 0 got logps that are not finite"
    ):
        logp.main(["--data_path", str(chain / "prepared"), "--model_name_or_path", str(broken),
                   "--max_length", str(MAX_LENGTH), "--output_dir", str(out)])  # fmt: skip
    assert not list(out.glob("*-part-*.parquet")) and not (out / "manifest.json").exists()


def test_step_zero_mismatch_is_recorded_and_stops_wrong_logps(tmp_path, chain, tiny_model_dir):
    # matching fp32 logps: ρ = 1 up to float rounding, recorded in run.json
    result = run_ips(chain, tiny_model_dir, tmp_path / "ok", "--learning_rate", "0", "--max_steps", "1")
    recorded = json.loads((tmp_path / "ok" / "run.json").read_text())["metrics"]["logp_mismatch"]
    assert recorded == result["logp_mismatch"] and recorded["starts_from_reference"] is True
    assert (
        recorded["mean_abs_log_ratio"] < 1e-6
        and recorded["max_abs_log_ratio"] < 1e-5
        and recorded["tokens"] > 50
    )
    assert abs(recorded["k3_kl"]) < 1e-9
    assert any("logp_mismatch/mean_abs_log_ratio" in h for h in result["log_history"])  # and in the tracker
    # logps that pass every binding but are wrong (a store edited after the fact): stopped before any update
    store = store_copy(chain, tmp_path)
    rewrite_logps(store, lambda values: [v - 0.2 for v in values])
    out = tmp_path / "bad"
    with pytest.raises(
        PipelineError, match=r"step 0: the policy starts from the reference, yet .* by 0.2 per token"
    ):
        run_ips(chain, tiny_model_dir, out, "--logp_dir", str(store), "--max_steps", "1")
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and info["metrics"]["logp_mismatch"][
        "mean_abs_log_ratio"
    ] == pytest.approx(0.2, abs=1e-4)
    assert not (out / "model.safetensors").exists()
    # `none` records and goes on
    result = run_ips(chain, tiny_model_dir, tmp_path / "none", "--logp_dir", str(store), "--max_steps", "1",
                     "--logp_mismatch_threshold", "none")  # fmt: skip
    assert result["logp_mismatch"]["mean_abs_log_ratio"] == pytest.approx(0.2, abs=1e-4)


def test_options_that_leave_no_signal_are_refused(tmp_path, chain, tiny_model_dir):
    # one response per prompt: posonly keeps rewards > 0.75, the prompt mean then takes every one to 0
    out = tmp_path / "o"
    with pytest.raises(PipelineError, match=r"train: all \d+ rewards left are 0 .* after reward_key=reward, "
                                            r"datafilter=posonly \(reward > 0.75\), reward_baseline=prompt_mean"):  # fmt: skip
        run_ips(chain, tiny_model_dir, out, "--datafilter", "posonly", "--reward_baseline", "prompt_mean")
    with pytest.raises(
        PipelineError, match="no rows left to train on after reward_key=reward, datafilter=posonly"
    ):
        run_ips(chain, tiny_model_dir, out, "--datafilter", "posonly", "--pos_threshold", "5")
    assert not out.exists()


def test_rerun_with_another_learning_rate_is_not_resumed(tmp_path, chain, tiny_model_dir):
    out = tmp_path / "o"
    first = ["--learning_rate", "1e-3", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]
    run_ips(chain, tiny_model_dir, out, *first)
    before = (out / "run.json").read_text()
    with pytest.raises(PipelineError, match=r"holds another run \(learning_rate: 0.001 there, 0.002 here\).*"
                                            r"another output_dir, or resume_from_checkpoint: false"):  # fmt: skip
        run_ips(chain, tiny_model_dir, out, "--learning_rate", "2e-3", "--max_steps", "2")
    assert (out / "run.json").read_text() == before  # the earlier run's record is untouched
    # the same run (logging and saving settings aside) resumes; resume_from_checkpoint false starts afresh
    again = run_ips(chain, tiny_model_dir, out, *first, "--logging_steps", "5")
    assert again["resumed_from"].endswith("checkpoint-2")
    fresh = run_ips(chain, tiny_model_dir, out, "--learning_rate", "2e-3", "--max_steps", "2",
                    "--resume_from_checkpoint", "false")  # fmt: skip
    assert fresh["resumed_from"] is None and fresh["global_step"] == 2


def test_train_script_names_its_output_after_the_knobs():
    env = {**os.environ, "dryrun": "1", "gpu": "0", "lr": "5", "kl": "0.1", "bsz": "2", "gacc": "16", "ml": "1024",
           "numepoch": "1"}  # fmt: skip
    env.pop("out", None)
    cmd = ["bash", str(REPO / "scripts/train.sh"), "d/", "m", "ref", "reward", "unprocessed_response", "none"]
    words = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout.split()
    assert words[words.index("--output_dir") + 1] == "d_ref_ips_reward_none_lr5_kl0.1_bs2x16_ml1024_ep1"


def test_max_train_samples_trains_on_that_many_rows(tmp_path, chain, tiny_model_dir):
    result = run_ips(chain, tiny_model_dir, tmp_path / "o", "--max_train_samples", "12", "--max_steps", "1")
    assert result["train_used_rows"] == 12 == result["train_limited_to_max_train_samples"]
    assert result["train_rows"] == len(train_rewards(chain)) > 12


def test_scripts_take_the_raw_logged_parquet(tmp_path, task_data, tiny_model_dir):
    """The users' first two commands on their raw logged parquet, as the old scripts took it: run_logp.sh
    prepares it (rkey/rspkey) and scores it; train.sh reuses that preparation and trains. A W&B run would be
    named from the knobs."""
    import shutil

    raw = tmp_path / "logs.parquet"
    shutil.copy(task_data["coderl_train"], raw)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "gpu": "0",
           "ml": str(MAX_LENGTH), "bsz": "4", "gacc": "1", "rkey": "normalized_reward"}  # fmt: skip
    env.pop("WORKER_NUM", None)
    logp_run = subprocess.run(["bash", str(REPO / "scripts/run_logp.sh"), str(raw), str(tiny_model_dir), "ref"],
                              capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert logp_run.returncode == 0, logp_run.stderr[-3000:]
    prepared = tmp_path / "logs_prepared"
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["config"]["reward_key"] == "normalized_reward" and manifest["rows_in"] > 0
    # gpu=0 runs on the CPU; the output is named DATA_TAG_logp; ml and bsz set the length and token budget
    logps = json.loads((tmp_path / "logs_prepared_ref_logp" / "manifest.json").read_text())
    assert logps["max_length"] == MAX_LENGTH and logps["config"]["token_budget"] == 4 * MAX_LENGTH
    stamp = (prepared / "manifest.json").stat().st_mtime_ns
    cmd = ["bash", str(REPO / "scripts/train.sh"), str(raw), str(tiny_model_dir), "ref", "normalized_reward",
           "unprocessed_response", "posonly", "--max_steps", "1", "--save_strategy", "no"]  # fmt: skip
    train_run = subprocess.run(cmd, capture_output=True, text=True, env={**env, "out": str(tmp_path / "o"),
                               "lr": "1000"}, timeout=300)  # fmt: skip
    assert train_run.returncode == 0, train_run.stderr[-3000:]
    assert (prepared / "manifest.json").stat().st_mtime_ns == stamp  # reused, not prepared again
    info = json.loads((tmp_path / "o" / "run.json").read_text())
    config = info["config"]
    assert config["data_path"] == str(prepared) and config["reward_key"] == "reward"
    assert config["logp_dir"] == f"{prepared}_ref_logp"
    assert (
        config["learning_rate"] == pytest.approx(1e-3) and config["datafilter"] == "posonly"
    )  # lr=1000: 1e-3
    assert info["metrics"]["global_step"] == 1
    named = subprocess.run(
        cmd, capture_output=True, text=True, env={**env, "dryrun": "1", "proj": "p"}, timeout=60
    )
    words = named.stdout.split()
    assert words[words.index("--run_name") + 1] == words[words.index("--output_dir") + 1].rsplit("/", 1)[-1]
