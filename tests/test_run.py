"""`pipeline run` (skip/rerun logic, references, sweeps) and `pipeline subset` (prompt- and size-matched).

The runner's logic is tested with a stand-in for the stages (it records each call and writes an output),
so these tests take a second; the demo test (tests/test_demo.py) runs the real stages through it.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.cli
from pipeline.errors import PipelineError
from pipeline.stages import run, subset


@pytest.fixture
def calls(monkeypatch):
    """Replace stage execution: record (stage, argv) and write the stage's output_dir like a real stage."""
    made: list[tuple[str, list[str]]] = []
    fail: set[str] = set()

    def fake_run_stage(stage, argv):
        out = argv[argv.index("--output_dir") + 1]
        made.append((stage, argv))
        from pathlib import Path

        from pipeline import outputs

        outputs.claim(out, stage)  # as real stages do before anything else
        (Path(out) / "partial.txt").write_text("started")
        (Path(out) / "run.json").write_text(json.dumps({"status": "running"}))  # as real stages do at start
        if any(f"/{name}" in out for name in fail):
            raise RuntimeError(f"{stage} died")
        (Path(out) / "run.json").write_text(json.dumps({"status": "completed", "metrics": {}}))

    monkeypatch.setattr(pipeline.cli, "run_stage", fake_run_stage)
    return made, fail


def write_pipeline(path, stages_yaml: str, extra: str = "") -> str:
    path.write_text(f"output_dir: {path.parent / 'out'}\n{extra}stages:\n{stages_yaml}")
    return str(path)


STAGES = """\
  - {name: a, stage: sft, recipe: a.yaml, args: {max_steps: 1}}
  - {name: b, stage: dpo, args: {model_name_or_path: "${a.output_dir}", beta: 0.1}}
  - {name: c, stage: rm, args: {max_steps: 3}}
  - {name: d, stage: eval, args: {models: ["${b.output_dir}", "${a.output_dir}"]}}
"""


def ran(calls_list) -> list[str]:
    return [argv[argv.index("--output_dir") + 1].rsplit("/", 1)[1] for _, argv in calls_list]


def test_skip_and_rerun_only_what_changed(tmp_path, calls):
    made, _ = calls
    (tmp_path / "a.yaml").write_text("learning_rate: 1.0e-3\n")
    spec = write_pipeline(tmp_path / "p.yaml", STAGES)
    run.main([spec])
    assert ran(made) == ["a", "b", "c", "d"]
    # references resolve to the referenced stage's output folder, lists keep their order
    b_argv = made[1][1]
    assert b_argv[b_argv.index("--model_name_or_path") + 1] == str(tmp_path / "out" / "a")
    d_argv = made[3][1]
    assert d_argv[d_argv.index("--models") + 1 : d_argv.index("--models") + 3] == [
        str(tmp_path / "out" / "b"), str(tmp_path / "out" / "a")]  # fmt: skip
    assert made[0][1][:2] == ["--config", str((tmp_path / "a.yaml").resolve())]

    made.clear()
    run.main([spec])
    assert made == []  # everything complete, nothing changed

    # touching b's config reruns b and its dependant d only
    write_pipeline(tmp_path / "p.yaml", STAGES.replace("beta: 0.1", "beta: 0.2"))
    run.main([spec])
    assert ran(made) == ["b", "d"]

    # a recipe file's content counts too: a, and through it b and d, rerun; c does not
    made.clear()
    (tmp_path / "a.yaml").write_text("learning_rate: 2.0e-3\n")
    run.main([spec])
    assert ran(made) == ["a", "b", "d"]

    made.clear()
    run.main([spec, "--from", "c"])
    assert ran(made) == ["c", "d"]
    info = json.loads((tmp_path / "out" / "pipeline_run.json").read_text())
    assert [r["action"] for r in info["points"]["0"]] == ["skip", "skip", "ran", "ran"]


def test_a_failed_stage_reruns_into_its_output_and_dry_run_runs_nothing(tmp_path, calls, capsys):
    made, fail = calls
    (tmp_path / "a.yaml").write_text("{}\n")
    spec = write_pipeline(tmp_path / "p.yaml", STAGES)
    fail.add("b")
    with pytest.raises(RuntimeError, match="dpo died"):
        run.main([spec])
    assert ran(made) == ["a", "b"]
    fail.clear()
    made.clear()
    run.main([spec, "--dry_run"])
    assert made == []
    plan = capsys.readouterr().out
    assert "[a] skip: complete, config unchanged" in plan and "[b] run: incomplete" in plan
    assert "pipeline dpo --model_name_or_path" in plan
    run.main([spec])
    assert ran(made) == ["b", "c", "d"]
    # the interrupted stage's output was kept (a resuming stage finds its checkpoints there)
    assert (tmp_path / "out" / "b" / "partial.txt").is_file()


def test_sweep_points_shared_stages_and_index(tmp_path, calls, capsys):
    made, _ = calls
    stages = """\
  - {name: data, stage: subset, shared: true, args: {size: 10}}
  - {name: train, stage: dpo, args: {max_train_samples: "${train_size}", seed: "${seed}", data: "${data.output_dir}"}}
"""
    spec = write_pipeline(
        tmp_path / "p.yaml", stages, "sweep:\n  train_size: [100, 200]\n  seed: [0, 1, 2]\n"
    )
    run.main([spec, "--list"])
    listing = capsys.readouterr().out.strip().splitlines()
    assert len(listing) == 6 and listing[1].endswith("train_size=100,seed=1")
    run.main([spec, "--index", "4"])
    assert [s for s, _ in made] == ["subset", "dpo"]
    argv = made[1][1]
    assert argv[argv.index("--max_train_samples") + 1] == "200" and argv[argv.index("--seed") + 1] == "1"
    assert argv[argv.index("--output_dir") + 1] == str(tmp_path / "out" / "train_size=200,seed=1" / "train")
    made.clear()
    run.main([spec])
    assert [s for s, _ in made] == ["dpo"] * 5  # the shared stage ran once, for all points
    with pytest.raises(PipelineError, match="sweep has 6 points"):
        run.main([spec, "--index", "6"])


def test_vars_and_bad_pipeline_files(tmp_path, calls):
    made, _ = calls
    spec = write_pipeline(tmp_path / "p.yaml", '  - {name: a, stage: sft, args: {max_steps: "${steps}"}}\n',
                          "vars:\n  steps: 5\n")  # fmt: skip
    run.main([spec, "--set", "steps=7"])
    assert made[0][1][made[0][1].index("--max_steps") + 1] == "7"
    with pytest.raises(PipelineError, match="--set nope: not a variable"):
        run.main([spec, "--set", "nope=1"])
    bad = {
        "  - {name: a, stage: sfx}\n": "unknown stage 'sfx'",
        '  - {name: a, stage: sft, args: {x: "${b.output_dir}"}}\n  - {name: b, stage: sft}\n': "runs after it",
        '  - {name: a, stage: sft, args: {x: "${zzz}"}}\n': "no stage name or sweep field",
        "  - {name: a, stage: sft}\n  - {name: a, stage: dpo}\n": "used twice",
        "  - {name: a, stage: sft, recipe: missing.yaml}\n": "recipe file not found",
        "  - {name: a, stage: sft, typo: 1}\n": "unknown key 'typo'",
    }
    for stages, message in bad.items():
        with pytest.raises(PipelineError, match=message):
            run.main([write_pipeline(tmp_path / "bad.yaml", stages)])


# ------------------------------------------------------------------------------------------------ subset


@pytest.fixture
def pairs_file(tmp_path):
    """20 prompts with 1 to 4 rows each (50 rows), in a scrambled order."""
    rows = [{"prompt": [{"role": "user", "content": f"task {p}"}], "chosen": f"c{p}.{r}", "rejected": "x"}
            for p in range(20) for r in range(1 + p % 4)]  # fmt: skip
    rows = rows[::2] + rows[1::2]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def subset_rows(pairs_file, tmp_path, size, mode="prefix", extra=()):
    out = tmp_path / f"{mode}-{size}"
    subset.main(["--data", pairs_file, "--size", str(size), "--mode", mode, "--output_dir", str(out), *extra])
    return pq.read_table(out / "train.parquet").to_pylist()


def test_prompt_matched_subsets_are_prefixes(tmp_path, pairs_file):
    small, large = subset_rows(pairs_file, tmp_path, 10), subset_rows(pairs_file, tmp_path, 30)
    assert len(small) == 10 and len(large) == 30
    assert large[:10] == small  # a smaller size is a prefix of a larger one
    prompts = [r["prompt"][0]["content"] for r in large]
    # each prompt's rows are contiguous, so a size adds whole prompts (the last one possibly cut)
    firsts = [prompts.index(p) for p in dict.fromkeys(prompts)]
    assert all(
        prompts[i : i + prompts.count(p)] == [p] * prompts.count(p)
        for p, i in zip(dict.fromkeys(prompts), firsts, strict=True)
    )
    assert subset_rows(pairs_file, tmp_path / "again", 10) == small  # the run seed plays no part


def test_size_matched_subsets_share_their_prompts(tmp_path, pairs_file):
    extra = ("--num_prompts", "8")
    sizes = {n: subset_rows(pairs_file, tmp_path, n, "same_prompts", extra) for n in (8, 12, 16)}
    prompt_sets = {n: {r["prompt"][0]["content"] for r in rows} for n, rows in sizes.items()}
    assert prompt_sets[8] == prompt_sets[12] == prompt_sets[16] and len(prompt_sets[8]) == 8
    assert sizes[16][:12] == sizes[12]  # topped up: the same rows plus more responses to the same prompts
    manifest = json.loads((tmp_path / "same_prompts-16" / "manifest.json").read_text())
    assert manifest["num_prompts"] == 8 and manifest["rows_in"] == 50
    with pytest.raises(PipelineError, match="first 8 prompts have only"):
        subset_rows(pairs_file, tmp_path, 40, "same_prompts", extra)
    with pytest.raises(PipelineError, match="needs --num_prompts"):
        subset_rows(pairs_file, tmp_path, 4, "same_prompts")
    with pytest.raises(PipelineError, match="only 50 rows"):
        subset_rows(pairs_file, tmp_path, 51)


def _source(tmp_path, name, prompts, per_prompt):
    rows = [{"prompt_pretokenized": json.dumps([{"role": "user", "content": f"task {p}"}]), "uid": f"{name}{p}.{r}",
             "response": f"answer {r}"} for p in prompts for r in range(per_prompt)]  # fmt: skip
    path = tmp_path / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(rows[::-1]), path)  # the file's own order plays no part
    return str(path)


def _subset(tmp_path, data, name, *flags):
    subset.main(["--data", data, "--output_dir", str(tmp_path / name), *flags])
    manifest = json.loads((tmp_path / name / "manifest.json").read_text())
    table = pq.read_table(tmp_path / name / "train.parquet")
    return manifest, {json.loads(p)[0]["content"] for p in table.column("prompt_pretokenized").to_pylist()}


def test_two_sources_order_their_shared_prompts_alike(tmp_path):
    # two pools of 200 prompts that differ by one prompt: their 10-prompt subsets share 9 or 10 prompts
    # (ordering by a shuffle of each file's own sorted prompts shared 1)
    a = _source(tmp_path, "a", range(200), 2)
    b = _source(tmp_path, "b", [*range(199), 500], 2)
    _, from_a = _subset(tmp_path, a, "sa", "--size", "10", "--size_unit", "prompts")
    _, from_b = _subset(tmp_path, b, "sb", "--size", "10", "--size_unit", "prompts")
    assert len(from_a) == len(from_b) == 10 and len(from_a & from_b) >= 9


def test_size_in_prompts_and_size_matched_sources(tmp_path):
    many = _source(tmp_path, "many", range(100), 4)  # 4 responses per prompt
    few = _source(tmp_path, "few", range(100), 2)  # 2 per prompt
    # in rows, the same size means other prompts: 100 rows are 25 prompts of one source, 50 of the other
    rows_many, in_many = _subset(tmp_path, many, "rm", "--size", "100")
    rows_few, in_few = _subset(tmp_path, few, "rf", "--size", "100")
    assert (rows_many["num_prompts"], rows_few["num_prompts"]) == (25, 50) and in_many < in_few
    # in prompts: the same 25 prompts from both sources
    assert _subset(tmp_path, many, "pm", "--size", "25", "--size_unit", "prompts")[1] == in_many
    assert _subset(tmp_path, few, "pf", "--size", "25", "--size_unit", "prompts")[1] == in_many
    # size-matched: 100 rows of the 2-per-prompt source, the other subset's 25 prompts first, then 25 new
    matched, in_matched = _subset(
        tmp_path, few, "mf", "--size", "100", "--match_subset", str(tmp_path / "rm")
    )
    assert matched["rows"] == 100 and in_many < in_matched and len(in_matched) == 50
    assert matched["matched_to"]["shared"] == 25 and matched["prompt_ids"][:25] == rows_many["prompt_ids"]


def test_jobs_run_sweep_points_as_separate_processes(tmp_path, pairs_file):
    """`--jobs 2`: each point is `pipeline run FILE --index I` in its own process (real `subset` stages)."""
    spec = tmp_path / "p.yaml"
    spec.write_text(f"output_dir: {tmp_path / 'out'}\nsweep: {{n: [4, 8, 12]}}\nstages:\n"
                    f"  - {{name: data, stage: subset, args: {{data: {pairs_file}, size: \"${{n}}\"}}}}\n")  # fmt: skip
    summary = run.main([str(spec), "--jobs", "2"])
    assert summary["points"] == {str(i): {"exit": 0} for i in range(3)}
    for n in (4, 8, 12):
        assert pq.read_table(tmp_path / "out" / f"n={n}" / "data" / "train.parquet").num_rows == n
        record = json.loads((tmp_path / "out" / f"n={n}" / "pipeline_run.json").read_text())
        assert record["points"][str((4, 8, 12).index(n))][0]["action"] == "ran"


ROUNDS = """\
  - {name: sft, stage: sft, args: {max_steps: 1}}
  - rounds: ${rounds}
    policy: "${sft.output_dir}"
    next_policy: ips
    reference: REFERENCE
    stages:
      - {name: collect, stage: collect, args: {model_name_or_path: "${round.policy}", seed: "${round.index}"}}
      - {name: logp, stage: logp, args: {data_path: "${collect.output_dir}", model_name_or_path: "${round.reference}"}}
      - {name: ips, stage: ips, args: {model_name_or_path: "${round.policy}", logp_dir: "${logp.output_dir}"}}
  - {name: eval, stage: eval, args: {models: ["${sft.output_dir}", "${rounds.policies}"], model_names: [sft, "${rounds.names}"]}}
"""


def arg(argv, key):
    return argv[argv.index(f"--{key}") + 1]


@pytest.mark.parametrize("reference", ["round", "first"])
def test_rounds_unroll_chain_and_skip(tmp_path, calls, reference):
    made, _ = calls
    path = write_pipeline(tmp_path / "p.yaml", ROUNDS.replace("REFERENCE", reference), "vars: {rounds: 2}\n")
    run.main([path])
    out = tmp_path / "out"
    by_dir = {arg(argv, "output_dir"): (stage, argv) for stage, argv in made}
    assert list(by_dir) == [str(out / d) for d in ("sft", "round_1/collect", "round_1/logp", "round_1/ips",
                                                   "round_2/collect", "round_2/logp", "round_2/ips", "eval")]  # fmt: skip
    collect2 = by_dir[str(out / "round_2/collect")][1]
    assert arg(collect2, "model_name_or_path") == str(
        out / "round_1/ips"
    )  # round 2 starts from round 1's policy
    assert arg(by_dir[str(out / "round_1/collect")][1], "model_name_or_path") == str(out / "sft")
    assert (arg(by_dir[str(out / "round_1/collect")][1], "seed"), arg(collect2, "seed")) == ("1", "2")
    assert arg(by_dir[str(out / "round_2/logp")][1], "data_path") == str(out / "round_2/collect")
    ref2 = arg(by_dir[str(out / "round_2/logp")][1], "model_name_or_path")
    assert ref2 == str(out / ("round_1/ips" if reference == "round" else "sft"))
    eval_argv = by_dir[str(out / "eval")][1]
    i = eval_argv.index("--models")
    assert eval_argv[i + 1 : i + 4] == [str(out / "sft"), str(out / "round_1/ips"), str(out / "round_2/ips")]
    i = eval_argv.index("--model_names")
    assert eval_argv[i + 1 : i + 4] == ["sft", "round_1", "round_2"]
    # a rerun skips every round; three rounds (--set) run only the third and what depends on it
    made.clear()
    summary = run.main([path])
    assert made == [] and all(s["action"] == "skip" for s in summary["points"]["0"])
    run.main([path, "--set", "rounds=3"])
    assert [arg(argv, "output_dir") for _, argv in made] == [
        str(out / d) for d in ("round_3/collect", "round_3/logp", "round_3/ips", "eval")]  # fmt: skip


def test_rounds_bad_blocks_are_one_line(tmp_path):
    good = ROUNDS.replace("REFERENCE", "round").replace("${rounds}", "2")
    cases = {
        ("rounds: 2", "rounds: 0"): "`rounds` must be a whole number >= 1",
        ("next_policy: ips", "next_policy: nope"): "`next_policy` must name one of the block's stages",
        ("reference: round", "reference: sft"): "`reference` must be one of round, first",
        ("reference: round", "policies: x"): "unknown key 'policies' in a rounds block",
        (
            'seed: "${round.index}"',
            'seed: "${round.seed}"',
        ): "use round.policy, round.reference or round.index",
    }
    for (old, new), message in cases.items():
        assert old in good
        path = write_pipeline(tmp_path / "bad.yaml", good.replace(old, new))
        with pytest.raises(PipelineError, match=message):
            run.load_pipeline(path)
    path = write_pipeline(
        tmp_path / "late.yaml", "  - {name: e, stage: eval, args: {models: ['${rounds.policies}']}}\n"
    )
    with pytest.raises(PipelineError, match="only known after a rounds block"):
        run.load_pipeline(path)


def test_multi_node_runs_substitute_launch_settings_per_node(tmp_path, calls, monkeypatch):
    """Every node runs the same pipeline file: `${env.X}` in `launch:` takes each node's value; a stage without
    `launch:` runs on node 0 alone (the others wait for its marker); launched stages run on every node."""
    import subprocess

    from pipeline.stages.run import execute

    made, _ = calls
    launched = []

    def fake_launch(command, check=False):
        launched.append(command)
        out = command[command.index("--output_dir") + 1]
        from pathlib import Path

        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "run.json").write_text(json.dumps({"status": "completed"}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(execute.subprocess, "run", fake_launch)
    stages = """\
  - {name: a, stage: prepare, args: {eval_fraction: 0}}
  - name: b
    stage: logp
    args: {data_path: "${a.output_dir}", max_length: 64}
    launch: {num_machines: 2, num_processes: 1, machine_rank: "${env.NODE_RANK}",
             main_process_ip: "${env.MASTER_ADDR}"}
"""
    path = write_pipeline(tmp_path / "p.yaml", stages)
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("PIPELINE_NODE_WAIT_S", "0.2")
    monkeypatch.setenv("NODE_RANK", "1")
    with pytest.raises(PipelineError, match="node 1 waited 0.2 s for node 0 to run it"):
        run.main([path])  # node 1 alone: stage a never appears
    assert made == [] and launched == []
    monkeypatch.setenv("NODE_RANK", "0")
    run.main([path])
    assert [stage for stage, _ in made] == ["prepare"]
    assert arg(launched[0], "machine_rank") == "0" and arg(launched[0], "main_process_ip") == "node0"
    assert arg(launched[0], "num_processes") == "1"  # a value of 1 is a value, not a bare flag (1 == True)
    # a change to the launched stage: node 1 joins it with its own rank and leaves the marker to node 0
    path = write_pipeline(tmp_path / "p.yaml", stages.replace("max_length: 64", "max_length: 128"))
    monkeypatch.setenv("NODE_RANK", "1")
    summary = run.main([path])
    assert [r["action"] for r in summary["points"]["0"]] == ["skip", "ran"] and len(made) == 1
    assert arg(launched[1], "machine_rank") == "1"
    marker = json.loads((tmp_path / "out" / ".pipeline" / "b.json").read_text())
    assert "128" not in json.dumps(marker["argv"])  # still node 0's record of the first config
