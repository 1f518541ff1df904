"""Tests for `pipeline report`: metrics of fake run.json files -> CSV, PNG figures, LaTeX and Markdown tables."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest

from pipeline import stats
from pipeline.errors import PipelineError
from pipeline.outputs import OWNER_FILE
from pipeline.stages import report
from pipeline.stages.report import main

pytest.importorskip("matplotlib")

T_975 = {1: 12.706204736174698, 2: 4.302652729911275, 4: 2.7764451051977987, 9: 2.2621571627409915}
SIZES = (1000, 2000, 4000)
SEEDS = (0, 1, 2)


def write_run(folder, stage, metrics, status="completed", seed=0, config=None, start="2025-01-01T00:00:00"):
    folder.mkdir(parents=True, exist_ok=True)
    run = {
        "stage": stage,
        "status": status,
        "seed": seed,
        "config": {"seed": seed, "output_dir": str(folder), **(config or {})},
        "metrics": metrics,
        "start": start,
        "end": None if status == "running" else start,
    }
    (folder / "run.json").write_text(json.dumps(run))
    return folder


def reward(size, seed):
    return round(0.1 * math.log2(size / 1000) + 0.02 * seed * seed + 0.3, 6)


def pass1(model, size, seed):
    return {"sft": 0.4, "ips": 0.5}[model] + size / 20000 + 0.01 * seed - 0.003 * seed * seed


@pytest.fixture
def sweep(tmp_path):
    """runs/size{N}_seed{S}/{ppo,eval}: ppo with eval_reward(_before) and train_size in its config; eval of two
    models (metrics `<model>/pass@1`, names from eval.json) that inherits train_size from its sibling stage.
    Plus one failed and one running point, which must be skipped."""
    root = tmp_path / "runs"
    for size in SIZES:
        for seed in SEEDS:
            point = root / f"size{size}_seed{seed}"
            write_run(point / "ppo", "ppo", {"eval_reward": reward(size, seed), "eval_reward_before": 0.25,
                      "train_prompts": size}, seed=seed, config={"train_size": size, "kl_coef": 0.05},
                      start="2025-01-01T00:00:00")  # fmt: skip
            metrics = {"num_prompts": 52}
            for model in ("sft", "ips"):
                metrics[f"{model}/pass@1"] = pass1(model, size, seed)
                metrics[f"{model}/pass@1_ci_low"] = 0.0
            write_run(point / "eval", "eval", metrics, seed=seed, config={"models": ["a", "b"]},
                      start="2025-01-01T01:00:00")  # fmt: skip
            (point / "eval" / "eval.json").write_text(json.dumps({"models": {"sft": {}, "ips": {}}}))
    write_run(
        root / "broken" / "ppo", "ppo", {"eval_reward": 99.0}, status="failed", config={"train_size": 1000}
    )
    write_run(root / "pending" / "ppo", "ppo", {}, status="running", config={"train_size": 1000})
    return root


def _by(result, metric, group):
    return {a["x"]: a for a in result["aggregates"] if a["metric"] == metric and a["group"] == group}


def _read_png(path):
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def test_t_critical_and_mean_ci_match_tables():
    for df, value in T_975.items():
        assert stats.t_critical(df) == pytest.approx(value, rel=1e-9)
    assert stats.t_critical(200) == pytest.approx(1.971896739, rel=1e-6)
    values = [0.3, 0.32, 0.38]
    mean, half = stats.mean_ci(values)
    assert mean == pytest.approx(sum(values) / 3)
    assert half == pytest.approx(T_975[2] * statistics.stdev(values) / math.sqrt(3), rel=1e-9)
    assert stats.mean_ci([0.7]) == (0.7, None)


def test_sweep_report_numbers_figures_and_tables(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    result = main([str(sweep), "--x", "train_size", "--metrics", "eval_reward", "pass@1",
                   "--output_dir", str(out), "--baseline", "pass@1:SFT=0.46"])  # fmt: skip
    printed = capsys.readouterr().out
    assert result["skipped"] == {"failed": 1, "running": 1}
    assert "skipped 2 not completed (failed: 1, running: 1)" in printed
    assert result["runs"] == 18 and result["records"] == 27  # 9 ppo + 9 evals of 2 models each
    assert result["groups"] == ["sft", "ips", "ppo"]  # models no run here trained come first

    # mean and 95% t-interval over the 3 seeds, by hand
    for size in SIZES:
        values = [reward(size, s) for s in SEEDS]
        agg = _by(result, "eval_reward", "ppo")[size]
        half = T_975[2] * statistics.stdev(values) / math.sqrt(3)
        assert agg["n"] == 3 and agg["values"] == values
        assert agg["mean"] == pytest.approx(sum(values) / 3, abs=1e-12)
        assert agg["ci95"] == pytest.approx(half, rel=1e-9)
        assert agg["ci_low"] == pytest.approx(agg["mean"] - half) and agg["ci_high"] == pytest.approx(
            agg["mean"] + half
        )
        for model in ("sft", "ips"):
            ev = _by(result, "pass@1", model)[size]
            assert ev["mean"] == pytest.approx(
                statistics.mean(pass1(model, size, s) for s in SEEDS), abs=1e-12
            )
    # zero-training point from eval_reward_before, at x = 0
    zero = _by(result, "eval_reward", "ppo")[0.0]
    assert (
        zero["before_training"]
        and zero["mean"] == pytest.approx(0.25)
        and zero["n"] == 3
        and zero["measurements"] == 9
    )
    assert result["baselines"] == {"SFT": {"pass@1": 0.46}}

    # runs.csv: one row per run (eval: per model), the runs' own numbers
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 27 and {r["status"] for r in rows} == {"completed"}
    assert not any("broken" in r["run_dir"] or "pending" in r["run_dir"] for r in rows)
    row = next(r for r in rows if r["stage"] == "ppo" and r["train_size"] == "2000" and r["seed"] == "1")
    assert float(row["eval_reward"]) == reward(2000, 1) and row["pass@1"] == ""
    row = next(r for r in rows if r["model"] == "ips" and r["train_size"] == "4000" and r["seed"] == "2")
    assert float(row["pass@1"]) == pass1("ips", 4000, 2) and row["group"] == "ips"

    # figures: real PNGs with content, and the printed paths
    assert [p.rsplit("/", 1)[1] for p in result["figures"]] == ["eval_reward.png", "pass_at_1.png"]
    for path in result["figures"]:
        assert (out / path.rsplit("/", 1)[1]).stat().st_size > 5000
        img = _read_png(path)
        assert img.size[0] > 300 and img.size[1] > 200
        assert len(set(img.getdata())) > 20  # lines, text, colours: not a blank canvas
        assert f"figure: {path}" in printed
    assert f"table: {out / 'table.tex'}" in printed

    # LaTeX: booktabs and the numbers
    tex = (out / "table.tex").read_text()
    for rule in ("\\toprule", "\\midrule", "\\bottomrule", "\\begin{tabular}", "\\end{table}"):
        assert rule in tex
    assert tex.index("\\toprule") < tex.index("\\midrule") < tex.index("\\bottomrule")
    agg = _by(result, "eval_reward", "ppo")[2000]
    assert f"{agg['mean']:.3f} $\\pm$ {agg['ci95']:.3f}" in tex
    ev = _by(result, "pass@1", "ips")[4000]
    assert f"{ev['mean']:.3f} $\\pm$ {ev['ci95']:.3f}" in tex
    assert "train\\_size" in tex and "eval\\_reward" in tex and "2k" in tex

    md = (out / "summary.md").read_text()
    assert f"| ppo | 2k | 3 | {agg['mean']:.3f} ± {agg['ci95']:.3f} | – |" in md
    assert "![eval_reward](eval_reward.png)" in md and "pass_at_1.png" in md
    assert "Skipped 2 runs not completed (failed: 1, running: 1)" in md
    saved = json.loads((out / "report.json").read_text())
    assert saved["aggregates"] == json.loads(json.dumps(result["aggregates"]))
    assert not [
        p for p in out.iterdir() if p.name.startswith(".") and p.name != OWNER_FILE
    ]  # no temporary files left


def test_log2_axis_detection_and_names():
    assert report.use_log2([1000, 2000, 4000, 8000])
    assert report.use_log2([0, 1000, 2000, 4000, 64000])
    assert not report.use_log2([100, 200, 300, 400])
    assert not report.use_log2([1000, 2000])
    assert report.fmt_x(64000) == "64k" and report.fmt_x(1024) == "1024" and report.fmt_x(0.5) == "0.5"
    assert report.figure_name("pass@1") == "pass_at_1.png" and report.figure_name("ips/kl") == "ips_kl.png"
    assert report.latex_escape("a_b & 50%") == "a\\_b \\& 50\\%"


def test_single_runs_bar_chart_zero_training_point_and_baseline_dir(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs / "sft", "sft", {"eval_loss": 0.5, "eval_loss_before": 6.9}, start="2025-01-01T00:00:00")
    write_run(runs / "dpo", "dpo", {"eval_loss": 0.4}, start="2025-01-01T02:00:00")
    base = write_run(tmp_path / "base" / "sft", "sft", {"eval_loss": 0.8})
    write_run(tmp_path / "base" / "other", "sft", {"eval_loss": 1.0}, seed=1)
    result = main([str(runs), "--metrics", "eval_loss", "--baseline", f"base={base.parent}"])
    out = runs / "report"
    assert result["output_dir"] == str(out) and result["x"] is None
    assert result["groups"] == ["sft", "dpo"]
    assert result["baselines"] == {"base": {"eval_loss": pytest.approx(0.9)}}
    by = {(a["group"], a["before_training"]): a for a in result["aggregates"]}
    assert by[("sft", False)]["mean"] == 0.5 and by[("sft", False)]["ci95"] is None
    assert by[("sft", True)]["mean"] == 6.9 and by[("dpo", False)]["mean"] == 0.4
    png = out / "eval_loss.png"
    assert png.stat().st_size > 5000 and len(set(_read_png(png).getdata())) > 20
    tex = (out / "table.tex").read_text()
    assert "sft (before training) & 1 & 6.900 \\\\" in tex and "dpo & 1 & 0.400 \\\\" in tex
    assert "\\toprule" in tex and "\\bottomrule" in tex
    # the report folder is not read back as runs on a rerun
    again = main([str(runs), "--metrics", "eval_loss", "--before_point", "false"])
    assert again["runs"] == 2 and not any(a["before_training"] for a in again["aggregates"])


def test_eval_models_are_groups_ordered_by_the_stage_that_trained_them(tmp_path):
    demo = tmp_path / "runs" / "demo"
    write_run(demo / "sft", "sft", {"eval_loss": 0.09, "eval_loss_before": 6.9}, start="2025-01-01T00:00:00")
    write_run(demo / "dpo", "dpo", {"eval_loss": 0.5}, start="2025-01-01T00:10:00")
    metrics = {"num_prompts": 52, "dpo/pass@1": 0.7, "base/pass@1": 0.0, "sft/pass@1": 0.77}
    write_run(demo / "eval", "eval", metrics, start="2025-01-01T00:20:00",
              config={"models": ["runs/demo/dpo", "runs/demo/tiny", "runs/demo/sft"],
                      "model_names": ["dpo", "base", "sft"]})  # fmt: skip
    result = main([str(demo), "--metrics", "pass@1", "eval_loss"])
    assert result["groups"] == ["base", "sft", "dpo"]  # base: trained by no run here; then by start time
    pass1 = [(a["group"], a["mean"]) for a in result["aggregates"] if a["metric"] == "pass@1"]
    assert pass1 == [("base", 0.0), ("sft", 0.77), ("dpo", 0.7)]
    md = (demo / "report" / "summary.md").read_text()
    assert "| sft | 1 | 0.770 | 0.090 |" in md and "| base | 1 | 0.000 | – |" in md


def test_default_metrics_group_by_field_and_x_from_folder_names(tmp_path):
    runs = tmp_path / "runs"
    for lr in (1e-5, 1e-4):
        for seed in (0, 1):
            for size in (0, 500, 1000):
                write_run(runs / f"lr{lr}" / f"train_size={size},seed={seed}", "dpo",
                          {"eval_accuracy": 0.5 + size / 4000 + seed / 100 + lr * 100, "eval_loss": 0.6},
                          seed=seed, config={"learning_rate": lr})  # fmt: skip
    result = main([str(runs), "--x", "train_size", "--group_by", "stage,learning_rate"])
    assert result["metrics"] == ["eval_accuracy", "eval_loss"]  # headline metrics found, in order
    assert result["groups"] == ["dpo, learning_rate=1e-05", "dpo, learning_rate=0.0001"]
    agg = _by(result, "eval_accuracy", "dpo, learning_rate=0.0001")
    assert sorted(agg) == [0.0, 500.0, 1000.0] and not agg[0.0]["before_training"]  # a real x = 0 run
    assert agg[500.0]["n"] == 2 and agg[500.0]["seeds"] == [0, 1]
    assert agg[500.0]["mean"] == pytest.approx(0.5 + 0.125 + 0.005 + 0.01)
    for name in ("eval_accuracy.png", "eval_loss.png"):
        assert (runs / "report" / name).stat().st_size > 5000


def test_repeated_seeds_that_differ_in_a_field_are_flagged(tmp_path, capsys):
    runs = tmp_path / "runs"
    for i, beta in enumerate((0.1, 0.5)):
        write_run(runs / f"b{i}", "dpo", {"eval_loss": 0.5 + i}, config={"beta": beta})
    main([str(runs), "--metrics", "eval_loss"])
    assert "differ in beta" in capsys.readouterr().err


def _error(argv) -> str:
    with pytest.raises(PipelineError) as info:
        main(argv)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line(sweep, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no run.json found" in _error([str(empty)])
    assert "RUN_DIR not found" in _error([str(tmp_path / "nope")])
    message = _error([str(sweep), "--metrics", "pass@5", "--output_dir", str(tmp_path / "o")])
    assert "metric 'pass@5' is in no completed run" in message
    assert "pass@1" in message and "eval_reward" in message  # says which metrics exist
    assert "did you mean 'pass@1'" in _error(
        [str(sweep), "--metrics", "pass@l", "--output_dir", str(tmp_path / "o")]
    )
    message = _error([str(sweep), "--x", "num_epochs", "--output_dir", str(tmp_path / "o")])
    assert "--x num_epochs: no run has that field" in message and "train_size" in message
    assert "several metrics" in _error(
        [str(sweep), "--baseline", "SFT=0.46", "--output_dir", str(tmp_path / "o")]
    )
    assert "neither a number nor a run folder" in _error([str(sweep), "--metrics", "pass@1", "--baseline",
                                                          "SFT=nowhere", "--output_dir", str(tmp_path / "o")])  # fmt: skip
    assert "--output_dir is required" in _error([str(sweep), str(empty)])
    failed = tmp_path / "failed"
    write_run(failed / "a", "sft", {"eval_loss": 1.0}, status="failed")
    assert "no completed run" in _error([str(failed)])
    assert not (tmp_path / "o").exists() and not (failed / "report").exists()  # nothing written


def test_cli_prints_one_line_error_and_exit_2(tmp_path, monkeypatch, capsys):
    from pipeline import cli

    monkeypatch.setitem(cli.STAGES, "report", ("pipeline.stages.report", "report"))
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipeline report: error: no run.json found under") and err.count("\n") == 1
    write_run(tmp_path / "sft", "sft", {"eval_loss": 0.5})
    assert cli.main(["report", str(tmp_path)]) == 0
    assert "figure: " in capsys.readouterr().out


def test_before_point_is_averaged_per_seed_and_single_runs_keep_their_own_interval(tmp_path):
    """7 sizes x 3 seeds log the same starting model 21 times: that is 3 observations (one per seed), so the
    interval is the t-interval of the 3 seed means, not of 21 values (~6.5x too narrow). A point of one run
    shows the run's own Wilson interval over its prompts, and the caption and title say which is which."""
    runs = tmp_path / "runs"
    sizes, before = (1000, 2000, 4000, 8000, 16000, 32000, 64000), {0: 0.20, 1: 0.30, 2: 0.28}
    for size in sizes:
        for seed in SEEDS:
            write_run(runs / f"size{size}_seed{seed}" / "dpo", "dpo",
                      {"win_rate": 0.5 + size / 1e6 + 0.01 * seed, "win_rate_before": before[seed]},
                      seed=seed, config={"train_size": size})  # fmt: skip
    result = main([str(runs), "--metrics", "win_rate", "--x", "train_size"])
    zero = _by(result, "win_rate", "dpo")[0.0]
    mean, half = stats.mean_ci(list(before.values()))
    assert zero["before_training"] and (zero["n"], zero["measurements"]) == (3, 21)
    assert zero["mean"] == pytest.approx(mean) and zero["ci95"] == pytest.approx(half, rel=1e-9)
    assert half == pytest.approx(T_975[2] * statistics.stdev(before.values()) / math.sqrt(3), rel=1e-9)
    md = (runs / "report" / "summary.md").read_text()
    assert "averaged per seed before the interval (n: seeds)" in md and "Student-t interval over seeds" in md

    # one eval run (one seed): each model's point is that run, with its own Wilson interval over 52 prompts
    single = tmp_path / "single" / "eval"
    metrics = {"num_prompts": 52}
    for model, correct in (("base", 0), ("sft", 41)):
        low, high = stats.wilson_interval(correct, 52)
        metrics |= {f"{model}/pass@1": correct / 52, f"{model}/pass@1_ci_low": low,
                    f"{model}/pass@1_ci_high": high, f"{model}/pass@1_interval": "wilson"}  # fmt: skip
    write_run(single, "eval", metrics, config={"models": ["a", "b"], "model_names": ["base", "sft"]})
    result = main([str(single.parent), "--metrics", "pass@1"])
    by = {a["group"]: a for a in result["aggregates"]}
    assert by["base"]["interval"] == "wilson over prompts" and by["base"]["n_prompts"] == 52
    assert (by["base"]["ci_low"], by["base"]["ci_high"]) == pytest.approx((0.0, 0.0688), abs=1e-4)
    assert by["sft"]["ci_high"] == pytest.approx(stats.wilson_interval(41, 52)[1])
    md = (single.parent / "report" / "summary.md").read_text()
    assert "a single run's own 95% Wilson score interval (0/1 per prompt) over its 52 prompts" in md
    assert "t-interval" not in md and "Student-t" not in md
    assert f"| sft | 1 | 0.788 [{by['sft']['ci_low']:.3f}, {by['sft']['ci_high']:.3f}] |" in md
    note = report.interval_note(result["aggregates"])
    assert note == "one run per point: its 95% Wilson interval over 52 prompts"


def test_report_says_which_points_are_prompt_matched(tmp_path):
    """Two sources over the same 40 prompts, 2 vs 4 responses each. Cut in prompts, both sizes hold the same
    prompts (prompt-matched); cut at 20 rows, the 4-response source covers 5 prompts and the other 10. The
    report traces each run's data (an eval run: through the model folder it scored) to its subset manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.stages import subset

    sources = {}
    for name, per_prompt in (("majority", 2), ("sc", 4)):
        rows = [{"prompt": [{"role": "user", "content": f"task {p}"}], "chosen": f"{name} {p} {j}", "uid": f"{p}-{j}"}
                for p in range(40) for j in range(per_prompt)]  # fmt: skip
        sources[name] = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), sources[name])
    runs = tmp_path / "runs"
    for x, unit in ((10, "prompts"), (20, "rows")):
        for name, source in sources.items():
            data = tmp_path / "subsets" / f"{name}_{x}"
            subset.main(
                ["--data", str(source), "--size", str(x), "--size_unit", unit, "--output_dir", str(data)]
            )
            model = write_run(runs / f"{name}_{x}" / "dpo", "dpo", {"win_rate": 0.5 + x / 100},
                              config={"train_data": str(data / "train.parquet"), "train_size": x,
                                      "source": name})  # fmt: skip
            write_run(runs / f"{name}_{x}" / "eval", "eval", {"policy/pass@1": 0.1 * x / 10},
                      config={"models": [str(model)], "model_names": ["policy"], "train_size": x,
                              "source": name})  # fmt: skip
    result = main([str(runs), "--metrics", "win_rate", "pass@1", "--x", "train_size", "--group_by",
                   "stage,source", "--output_dir", str(tmp_path / "report")])  # fmt: skip
    assert result["groups"] == ["dpo, source=majority", "policy, source=majority", "dpo, source=sc",
                                "policy, source=sc"]  # fmt: skip
    by_x = {e["x"]: e for e in result["prompt_matching"]}
    assert by_x[10.0]["prompts"] == {g: 10 for g in result["groups"]}  # the eval runs traced via their model
    assert by_x[20.0]["prompts"] == {"dpo, source=majority": 10, "policy, source=majority": 10,
                                     "dpo, source=sc": 5, "policy, source=sc": 5}  # fmt: skip
    assert by_x[10.0]["matched"] and by_x[10.0]["shared"] == 10
    assert not by_x[20.0]["matched"] and by_x[20.0]["shared"] == 5
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "## Prompt matching" in md
    assert "train_size=10: prompt-matched: every group trained on the same 10 prompts" in md
    assert "train_size=20: not prompt-matched" in md and "5 shared by all" in md
