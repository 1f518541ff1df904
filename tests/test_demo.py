"""`pipeline demo --fast`: every stage of the demo chain runs for real (tiny budgets) through `pipeline run`,
the pass@1 table has one row per stage, the report is drawn, and a rerun skips every stage."""

from __future__ import annotations

import json

from pipeline.stages import demo

STAGE_OUTPUTS = {
    "tiny": "config.json", "data": "sft_train.parquet", "sft": "run.json", "prepare": "manifest.json",
    "logp": "manifest.json", "ips": "run.json", "dpo": "run.json", "rm": "run.json", "ppo": "run.json",
    "round_1/collect": "run.json", "round_1/prepare": "manifest.json", "round_1/logp": "manifest.json",
    "round_1/ips": "run.json", "eval": "eval.json",
}  # fmt: skip


def test_fast_demo_runs_every_stage_then_skips_them(tmp_path, capsys):
    out = tmp_path / "demo"
    result = demo.main(["--fast", "--output_dir", str(out)])
    for stage, output in STAGE_OUTPUTS.items():
        assert (out / stage / output).is_file(), stage
        if output == "run.json":
            assert json.loads((out / stage / output).read_text())["status"] == "completed", stage
    assert [r["stage"] for r in result["rows"]] == ["base", "sft", "ips", "dpo", "ppo", "round_1"]
    assert all(0.0 <= r["pass@1"] <= 1.0 for r in result["rows"])
    assert all(r["seconds"] > 0 for r in result["rows"])  # each policy's training wall time
    table = (out / "pass_at_1.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in table) == 1 + 6  # header + one row per stage
    # the round started from the SFT model and trained on the answers it sampled and the sandbox passed
    collect_config = json.loads((out / "round_1" / "collect" / "run.json").read_text())["config"]
    assert collect_config["model_name_or_path"] == str(out / "sft")
    assert (out / "report" / "pass_at_1.png").stat().st_size > 5000
    assert "\\toprule" in (out / "report" / "table.tex").read_text()
    printed = capsys.readouterr().out
    assert "pass@1 table:" in printed and "figure:" in printed
    # the stages' own checks held: PPO scored with the RM the chain trained, DPO read the logp stage's output
    ppo_config = json.loads((out / "ppo" / "run.json").read_text())["config"]
    assert ppo_config["reward_model_path"] == str(out / "rm")
    assert json.loads((out / "dpo" / "run.json").read_text())["config"]["ref_logps_dir"] == str(out / "logp")

    again = demo.main(["--fast", "--output_dir", str(out)])
    actions = [r["action"] for r in again["summary"]["points"]["0"]]
    assert actions == ["skip"] * len(STAGE_OUTPUTS)
    assert again["rows"] == result["rows"]
