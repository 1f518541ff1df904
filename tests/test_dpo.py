"""`pipeline dpo`: stored reference logps give TRL's own first-step loss; DPO from SFT widens the held-out
margin; bad preference files and mismatched logps are refused in one line."""

import math
import shutil

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.models import load_for_generation
from pipeline.stages import dpo, logp, prepare
from pipeline.stages.generate import greedy_pass_rate
from pipeline.tasks.synthetic import export_task

FAST = ["--bf16", "false", "--gradient_checkpointing", "false", "--dtype", "float32", "--report_to", "none",
        "--save_strategy", "no", "--max_length", "128", "--seed", "0", "--logging_steps", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def prepared_with_logps(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("dpo_prepared")
    task = export_task(root / "task", num_problems=120, seed=0, responses_per_problem=3)
    prepare.main(["--data_path", task["coderl_train"], "--output_dir", str(root / "prepared"),
                  "--tokenizer_name_or_path", str(tiny_model_dir), "--eval_fraction", "0.1",
                  "--pair_margin", "0.5"])  # fmt: skip
    logp.main(["--data_path", str(root / "prepared"), "--model_name_or_path", str(tiny_model_dir),
               "--max_length", "128"])  # fmt: skip
    return root / "prepared", root / "prepared_ref_logp"


def first_losses(result, n=2):
    return [h["loss"] for h in result["log_history"] if "loss" in h][:n]


def test_stored_logps_give_trls_first_step_loss(tmp_path, tiny_model_dir, prepared_with_logps):
    data, logps = prepared_with_logps
    common = [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--data_path",
        str(data),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--eval_strategy",
        "no",
        "--learning_rate",
        "1e-3",
        *FAST,
    ]
    stored = dpo.main([*common, "--output_dir", str(tmp_path / "stored"), "--ref_logps_dir", str(logps)])
    live = dpo.main([*common, "--output_dir", str(tmp_path / "live")])  # TRL runs the reference model itself
    pre = dpo.main([*common, "--output_dir", str(tmp_path / "pre"), "--precompute_ref_log_probs", "true"])
    assert stored["reference"] == "stored logps" and live["reference"] == "starting model"
    print("first losses stored/live/precompute:", first_losses(stored), first_losses(live), first_losses(pre))
    assert first_losses(stored) == pytest.approx(first_losses(live), abs=1e-5)
    assert first_losses(stored) == pytest.approx(first_losses(pre), abs=1e-5)
    # loss at step 1 is log 2 exactly (policy == reference) only if the stored logps are right
    assert first_losses(stored)[0] == pytest.approx(0.693147, abs=1e-4)


def test_stored_logps_of_another_length_are_refused(tmp_path, tiny_model_dir, prepared_with_logps):
    data, logps = prepared_with_logps
    with pytest.raises(PipelineError, match="max_length"):
        dpo.main(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--ref_logps_dir",
                  str(logps), "--output_dir", str(tmp_path / "x"), "--max_steps", "1", *FAST[:-6],
                  "--max_length", "64"])  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_pairs_whose_rows_are_missing_are_refused(tmp_path, tiny_model_dir, prepared_with_logps):
    data, _ = prepared_with_logps
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    paired = pq.read_table(next((data / "pairs").glob("train-*.parquet"))).column("chosen_uid")[0]
    for shard in (broken / "rl").glob("train-*.parquet"):  # drop the row of a chosen answer
        table = pq.read_table(shard)
        pq.write_table(table.filter(pa.compute.not_equal(table.column("uid"), paired)), shard)
    with pytest.raises(PipelineError, match="lacks"):
        dpo.main(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(broken), "--output_dir",
                  str(tmp_path / "out"), *FAST])  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_preference_file_without_chosen_is_refused(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "rejected": ["a"]}), bad)
    with pytest.raises(PipelineError, match=r"bad.parquet.*'chosen'"):
        dpo.main(["--model_name_or_path", str(tiny_model_dir), "--train_data", str(bad), "--output_dir",
                  str(tmp_path / "out"), *FAST])  # fmt: skip
    assert not (tmp_path / "out").exists()
    # a recipe's data_path next to a train_data flag: refused, not silently preferred; '' drops it
    with pytest.raises(PipelineError, match="data_path and train_data/eval_data are both set"):
        dpo.main(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(tmp_path), "--train_data",
                  str(bad), "--output_dir", str(tmp_path / "out"), *FAST])  # fmt: skip
    with pytest.raises(PipelineError, match=r"bad.parquet.*'chosen'"):
        dpo.main(["--model_name_or_path", str(tiny_model_dir), "--data_path", "", "--train_data", str(bad),
                  "--output_dir", str(tmp_path / "out"), *FAST])  # fmt: skip


def test_dpo_from_sft_widens_held_out_margin(tmp_path, sft_demo_setup):
    # from the demo's well-trained SFT model, with the demo's DPO settings (beta 0.5, lr 5e-5, 40 steps)
    sft_dir, data = sft_demo_setup["model"], sft_demo_setup["data"]
    result = dpo.main(["--model_name_or_path", sft_dir, "--train_data", data["pairs_train"], "--eval_data",
                       data["pairs_eval"], "--output_dir", str(tmp_path / "dpo"), "--max_steps", "40",
                       "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
                       "--learning_rate", "5e-5", "--lr_scheduler_type", "cosine", "--beta", "0.5",
                       "--eval_strategy", "no", *FAST[:-4], "--max_length", "256", "--seed", "0"])  # fmt: skip
    before, after = result["eval_rewards/margins_before"], result["eval_rewards/margins"]
    print(f"eval margin {before:.3f} -> {after:.3f}; accuracy -> {result['eval_rewards/accuracies']:.3f}")
    assert before == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    # measured: margin 0 -> 1.08, accuracy 0.994 (1.08-1.13 and 0.988-0.994 over SFT seeds 0/1 x DPO seeds 0/1)
    assert after > 0.8 and result["eval_rewards/accuracies"] > 0.95
    held_out = sft_demo_setup["held_out"]
    sft_rate = greedy_pass_rate(*load_for_generation(sft_dir), held_out)
    dpo_rate = greedy_pass_rate(*load_for_generation(str(tmp_path / "dpo")), held_out)
    print(f"held-out greedy pass@1: SFT {sft_rate:.3f} -> DPO {dpo_rate:.3f}")
    # Measured 0.827 -> 0.827 (seed 0). Over SFT seeds 0/1 x DPO seeds 0/1: 0.827 -> 0.827, 0.827 and
    # 0.808 -> 0.827, 0.827. From an under-trained SFT model (the `sft_setup` fixture, 0.46) DPO fell to 0.35:
    # the pairs teach the operation, not the constant copying such a model has not learned yet.
    assert dpo_rate >= sft_rate, (sft_rate, dpo_rate)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [([], math.log(2)), (["--ld_alpha", "0.5"], math.log(2)), (["--loss_type", "ipo", "--beta", "0.5"], 1.0)],
    ids=["sigmoid", "sigmoid-ld_alpha", "ipo"],
)
def test_stored_logps_at_lr_0_give_the_loss_at_the_reference(
    tmp_path, tiny_model_dir, prepared_with_logps, flags, expected
):
    # policy == reference and no update: every pair's log-ratios are 0, so the sigmoid loss is -log σ(0) = log 2
    # whatever TRL option weights the tokens (LD-DPO weights the reference's tokens past the shorter response
    # as the policy's), and IPO's is (0 - 1/(2β))² = 1 at β 0.5
    data, logps = prepared_with_logps
    result = dpo.main(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--ref_logps_dir",
                       str(logps), "--output_dir", str(tmp_path / "o"), "--max_steps", "2", "--learning_rate", "0",
                       "--per_device_train_batch_size", "8", "--eval_strategy", "no", *FAST, *flags])  # fmt: skip
    assert first_losses(result) == pytest.approx([expected] * 2, abs=1e-5)
    assert result["logp_contract"]["bound"] is True


def test_options_stored_logps_cannot_honour_are_refused(tmp_path, tiny_model_dir, prepared_with_logps):
    data, logps = prepared_with_logps
    common = ["--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--ref_logps_dir", str(logps),
              "--output_dir", str(tmp_path / "o"), *FAST]  # fmt: skip
    with pytest.raises(
        PipelineError, match=r"sync_ref_model=True cannot be honoured with stored reference logps"
    ):
        dpo.main([*common, "--sync_ref_model", "true"])
    with pytest.raises(PipelineError, match=r"truncation_mode=keep_end cannot be honoured"):
        dpo.main([*common, "--truncation_mode", "keep_end"])
    with pytest.raises(PipelineError, match=r"another dtype \(float32 there, bfloat16 here\)"):
        dpo.main([*common, "--dtype", "bfloat16"])
    broken = tmp_path / "nan_logps"
    shutil.copytree(logps, broken)
    part = sorted(broken.glob("train-part-*.parquet"))[0]
    table = pq.read_table(part)
    values = table.column("logps").to_pylist()
    values[2][0] = float("nan")
    pq.write_table(table.set_column(1, "logps", pa.array(values, pa.list_(pa.float32()))), part)
    with pytest.raises(PipelineError, match="1 rows hold logps that are not finite"):
        dpo.main([*common, "--ref_logps_dir", str(broken)])
    assert not (tmp_path / "o").exists()
