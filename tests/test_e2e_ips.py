"""End to end on the synthetic task: SFT → prepare → logp → IPS raises held-out pass@1 (sandbox-measured).

The heaviest test of the suite (~1.5 min on 2 cores): a 4-layer tiny model is SFT'd for 200 steps (it then
solves some held-out problems), its own tokenizer filters the code-RL rows, it scores them as the
reference, and 100 IPS steps from it with `datafilter: posonly` (the users' rejection-sampling mode) must
raise greedy pass@1 on the held-out problems by at least 0.10. Mixed-sign rewards (`datafilter: none`) are
not asserted here: on this task a wrong answer differs from the right one in a single token, so pushing
down its likelihood also pushes down the shared tokens, and the outcome varied with the seed.
"""

from pipeline.models import load_for_generation
from pipeline.stages import ips, logp, prepare
from pipeline.stages.generate import greedy_pass_rate


def test_ips_beats_its_sft_starting_point(tmp_path, sft_setup):
    sft_dir, data, common = sft_setup["model"], sft_setup["data"], sft_setup["common"]
    prepare.main(["--data_path", data["coderl_train"], "--output_dir", str(tmp_path / "prepared"),
                  "--tokenizer_name_or_path", sft_dir, "--eval_fraction", "0"])  # fmt: skip
    logp.main(["--data_path", str(tmp_path / "prepared"), "--model_name_or_path", sft_dir,
               "--max_length", "256", "--splits", "train"])  # fmt: skip
    result = ips.main(["--data_path", str(tmp_path / "prepared"), "--model_name_or_path", sft_dir,
                       "--output_dir", str(tmp_path / "ips"), "--max_steps", "100", "--learning_rate", "5e-4",
                       "--datafilter", "posonly", *common])  # fmt: skip
    assert 300 < result["train_used_rows"] < result["train_rows"]  # only rows with reward > 0.75 trained

    held_out = sft_setup["held_out"]  # the problems the export held out
    before = greedy_pass_rate(*load_for_generation(sft_dir), held_out)
    after = greedy_pass_rate(*load_for_generation(str(tmp_path / "ips")), held_out)
    print(f"held-out greedy pass@1: SFT {before:.3f} -> IPS (posonly) {after:.3f}")
    assert before > 0, "the SFT model should solve some held-out problems for the comparison to mean much"
    assert after >= before + 0.10, (before, after)
