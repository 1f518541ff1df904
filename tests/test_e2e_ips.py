"""End to end on the synthetic task: SFT → prepare → logp → IPS raises held-out pass@1 (sandbox-measured).

The heaviest test of the suite (~1.5 min on 2 cores): a 4-layer tiny model is SFT'd for 200 steps (it then
solves some held-out problems), its own tokenizer filters the code-RL rows, it scores them as the
reference, and 100 IPS steps from it with `datafilter: posonly` (the users' rejection-sampling mode) must
raise greedy pass@1 on the held-out problems by at least 0.10. Mixed-sign rewards (`datafilter: none`) are
not asserted here: on this task a wrong answer differs from the right one in a single token, so pushing
down its likelihood also pushes down the shared tokens, and the outcome varied with the seed.
"""

from pipeline.stages import ips, logp, prepare, sft
from pipeline.stages.generate import greedy_pass_rate, load_for_generation
from pipeline.tasks.synthetic import export_task, generate_problems, split_problems
from pipeline.tiny import make_tiny_model

NUM_PROBLEMS = 520
COMMON = ["--bf16", "false", "--gradient_checkpointing", "false", "--dtype", "float32", "--report_to", "none",
          "--eval_strategy", "no", "--save_strategy", "no", "--per_device_train_batch_size", "16",
          "--max_length", "256", "--seed", "0"]  # fmt: skip


def test_ips_beats_its_sft_starting_point(tmp_path):
    model = make_tiny_model(tmp_path / "tiny", seed=0, hidden_size=128, num_layers=4, intermediate_size=512)
    data = export_task(tmp_path / "data", num_problems=NUM_PROBLEMS, seed=0, responses_per_problem=2)
    sft.main(["--model_name_or_path", str(model), "--train_data", data["sft_train"], "--output_dir",
              str(tmp_path / "sft"), "--max_steps", "200", "--learning_rate", "2e-3", "--assistant_only_loss",
              "true", *COMMON])  # fmt: skip
    prepare.main(["--data_path", data["coderl_train"], "--output_dir", str(tmp_path / "prepared"),
                  "--tokenizer_name_or_path", str(tmp_path / "sft"), "--eval_fraction", "0"])  # fmt: skip
    logp.main(["--data_path", str(tmp_path / "prepared"), "--model_name_or_path", str(tmp_path / "sft"),
               "--max_length", "256", "--splits", "train"])  # fmt: skip
    result = ips.main(["--data_path", str(tmp_path / "prepared"), "--model_name_or_path", str(tmp_path / "sft"),
                       "--output_dir", str(tmp_path / "ips"), "--max_steps", "100", "--learning_rate", "5e-4", "--datafilter", "posonly",
                       *COMMON])  # fmt: skip
    assert 300 < result["train_used_rows"] < result["train_rows"]  # only rows with reward > 0.75 trained

    _, held_out = split_problems(generate_problems(NUM_PROBLEMS, 0), 0.1, 0)  # the problems export held out
    before = greedy_pass_rate(*load_for_generation(str(tmp_path / "sft")), held_out)
    after = greedy_pass_rate(*load_for_generation(str(tmp_path / "ips")), held_out)
    print(f"held-out greedy pass@1: SFT {before:.3f} -> IPS (posonly) {after:.3f}")
    assert before > 0, "the SFT model should solve some held-out problems for the comparison to mean much"
    assert after >= before + 0.10, (before, after)
