"""Lose nothing the user did not ask to lose: output folders, dry runs, checkpoints, final models.

Every stage writes only into a folder that is absent, empty or its own earlier output; `pipeline run` and
`demo` replace only their own; a dry run never touches a real run; only checkpoints the pipeline began are
deleted; a final model replaces the previous one whole.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import pipeline.cli
from pipeline import outputs
from pipeline.errors import PipelineError
from pipeline.training import BEGUN_MARKER, COMPLETE_MARKER, FINAL_RECORD, resolve_resume, swap_in_final_model

TRAIN = ["--bf16", "false", "--gradient_checkpointing", "false", "--dtype", "float32", "--report_to", "none",
         "--max_length", "96", "--max_train_samples", "16", "--per_device_train_batch_size", "4"]  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("a week of results\n")
    (path / "data").mkdir()
    (path / "data" / "train.parquet").write_bytes(b"not really parquet")
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model_dir, task_data):
    """A prepared folder with its logps (what logp and ips read)."""
    from pipeline.stages import logp, prepare

    root = tmp_path_factory.mktemp("stores")
    prepare.main(["--data_path", task_data["coderl_train"], "--output_dir", str(root / "prepared"),
                  "--tokenizer_name_or_path", str(tiny_model_dir), "--eval_fraction", "0"])  # fmt: skip
    logp.main(["--data_path", str(root / "prepared"), "--model_name_or_path", str(tiny_model_dir),
               "--max_length", "96", "--output_dir", str(root / "logp")])  # fmt: skip
    return root


def stage_argv(stage: str, tiny: Path, data: dict, stores: Path) -> list[str]:
    model = ["--model_name_or_path", str(tiny)]
    online = [
        "--train_data",
        data["sft_train"],
        "--synthetic_task_seed",
        "0",
        "--bf16",
        "false",
        "--report_to",
        "none",
    ]
    return {
        "tiny-model": [],
        "synthetic-data": ["--num_problems", "8"],
        "subset": ["--data", data["pairs_train"], "--size", "4"],
        "prepare": ["--data_path", data["coderl_train"], "--overwrite", "true"],
        "logp": [*model, "--data_path", str(stores / "prepared"), "--max_length", "96"],
        "sft": [*model, "--train_data", data["sft_train"], *TRAIN],
        "rm": [*model, "--train_data", data["pairs_train"], *TRAIN],
        "dpo": [*model, "--train_data", data["pairs_train"], *TRAIN],
        "grpo": [*model, *online, "--num_generations", "4", "--per_device_train_batch_size", "4"],
        "rloo": [*model, *online, "--num_generations", "4", "--per_device_train_batch_size", "4"],
        "ips": [
            *model,
            "--data_path",
            str(stores / "prepared"),
            "--logp_dir",
            str(stores / "logp"),
            "--max_length",
            "96",
            "--bf16",
            "false",
            "--report_to",
            "none",
        ],
        "ppo": [
            *model,
            "--train_data",
            data["sft_train"],
            "--synthetic_task_seed",
            "0",
            "--dtype",
            "float32",
            "--report_to",
            "none",
        ],
        "eval": ["--models", str(tiny), "--synthetic_num_problems", "4"],
        "report": [str(stores)],
    }[stage]


@pytest.mark.parametrize("stage", ["tiny-model", "synthetic-data", "subset", "prepare", "logp", "sft", "rm", "dpo",
                                   "grpo", "rloo", "ips", "ppo", "eval", "report"])  # fmt: skip
def test_user_files_in_an_output_dir_survive_every_stage(
    stage, tmp_path, tiny_model_dir, task_data, stores, capsys
):
    precious = user_folder(tmp_path / "precious")
    before = snapshot(precious)
    argv = [stage, *stage_argv(stage, tiny_model_dir, task_data, stores), "--output_dir", str(precious)]
    assert pipeline.cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "holds files the pipeline did not write (data, notes.txt)" in err.strip().splitlines()[-1], err
    assert "Traceback" not in err
    assert snapshot(precious) == before and not (precious / outputs.OWNER_FILE).exists()


def test_overwrite_never_replaces_the_working_directory_or_a_folder_holding_the_input(
    tmp_path, task_data, monkeypatch
):
    from pipeline.stages import prepare

    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for target in (".", str(work)):
        with pytest.raises(PipelineError, match="the working directory"):
            outputs.check_replaceable(target, "prepare")
    # a prepare output that the next run's input was put into: replacing it would delete the input
    data = tmp_path / "data"
    prepare.main(["--data_path", task_data["coderl_train"], "--output_dir", str(data)])
    (data / "raw.parquet").write_bytes(Path(task_data["coderl_train"]).read_bytes())
    before = snapshot(data)
    with pytest.raises(PipelineError, match="this stage's input"):
        prepare.main(
            ["--data_path", str(data / "raw.parquet"), "--output_dir", str(data), "--overwrite", "true"]
        )
    assert snapshot(data) == before
    # its own earlier output is replaced whole (the old files go, the marker stays)
    prepare.main(["--data_path", task_data["coderl_train"], "--output_dir", str(data), "--overwrite", "true"])
    assert not (data / "raw.parquet").exists() and outputs.owner(data) == "prepare"
    assert not list(tmp_path.glob(".data.*"))  # nothing set aside is left behind


def test_replacing_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    folder = tmp_path / "tiny"
    with outputs.replacing(folder, "tiny-model") as tmp:
        (tmp / "config.json").write_text("old")
    with pytest.raises(RuntimeError), outputs.replacing(folder, "tiny-model") as tmp:
        (tmp / "config.json").write_text("new, half written")
        raise RuntimeError("killed")
    assert (folder / "config.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "tiny"
    ]


def test_names_that_become_paths_are_checked(tmp_path):
    from pipeline.stages import run

    for name in ("..", ".", "a/b", ""):
        with pytest.raises(PipelineError, match="becomes part of a path"):
            outputs.check_name(name, "tag")
    spec = tmp_path / "p.yaml"
    spec.write_text(f"output_dir: {tmp_path / 'out'}\nstages:\n  - {{name: '.', stage: sft}}\n")
    with pytest.raises(PipelineError, match="stage name '.' becomes part of a path"):
        run.load_pipeline(spec)
    spec.write_text(
        f"output_dir: {tmp_path / 'out'}\nsweep: {{seed: ['../x']}}\nstages:\n  - {{stage: sft}}\n"
    )
    with pytest.raises(PipelineError, match="sweep value of seed: '../x'"):
        run.load_pipeline(spec)


# ------------------------------------------------------------------------------------------------ pipeline run


def test_pipeline_run_and_demo_delete_only_their_own_folders(tmp_path, monkeypatch, capsys):
    from pipeline.stages import demo, run

    made = []

    def fake_stage(stage, argv):  # a real stage's ownership rule, without its work
        out = argv[argv.index("--output_dir") + 1]
        outputs.claim(out, stage)
        made.append(stage)
        (Path(out) / "run.json").write_text(json.dumps({"stage": stage, "status": "completed"}))

    monkeypatch.setattr(pipeline.cli, "run_stage", fake_stage)
    # a stage whose output_dir is the user's data folder: refused, not wiped as "output of an unknown config"
    data = user_folder(tmp_path / "data")
    before = snapshot(data)
    spec = tmp_path / "p.yaml"
    spec.write_text(f"output_dir: {tmp_path / 'out'}\nstages:\n  - {{name: sft, stage: sft, args: "
                    f"{{output_dir: {data}}}}}\n")  # fmt: skip
    with pytest.raises(PipelineError, match="stage 'sft': output_dir .* did not write"):
        run.main([str(spec)])
    assert snapshot(data) == before and made == []

    # a config change replaces the stage's own earlier output (set aside, deleted once the new one completes)
    spec.write_text(
        f"output_dir: {tmp_path / 'out'}\nstages:\n  - {{name: sft, stage: sft, args: {{seed: 1}}}}\n"
    )
    run.main([str(spec)])
    (tmp_path / "out" / "sft" / "old.txt").write_text("from the first config")
    spec.write_text(
        f"output_dir: {tmp_path / 'out'}\nstages:\n  - {{name: sft, stage: sft, args: {{seed: 2}}}}\n"
    )
    run.main([str(spec)])
    assert made == ["sft", "sft"] and not (tmp_path / "out" / "sft" / "old.txt").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".pipeline",
        outputs.OWNER_FILE,
        "pipeline_run.json",
        "sft",
    ]

    # the demo into a folder of the user's: nothing of it is touched
    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    with pytest.raises(PipelineError, match="did not write"):
        demo.main(["--output_dir", str(mine), "--fast"])
    assert snapshot(mine) == before


# ------------------------------------------------------------------------------------------------ dry runs


def test_dry_run_leaves_the_real_run_untouched(tmp_path, tiny_model_dir, task_data, monkeypatch):
    from pipeline.stages import sft

    real = tmp_path / "real"
    pipeline.cli.run_stage("sft", ["--model_name_or_path", str(tiny_model_dir), "--train_data", task_data["sft_train"],
                           *TRAIN, "--output_dir", str(real), "--max_steps", "2", "--save_strategy", "steps",
                           "--save_steps", "1"])  # fmt: skip
    before = snapshot(real)
    assert "checkpoint-2/" + COMPLETE_MARKER in before
    monkeypatch.chdir(tmp_path)
    # what train.sh does: the real output_dir on the command line, plus --dry_run
    sft.main(["--model_name_or_path", str(tiny_model_dir), "--train_data", task_data["sft_train"], *TRAIN,
              "--output_dir", str(real), "--dry_run", "true"])  # fmt: skip
    assert snapshot(real) == before
    dry = tmp_path / "dry_runs" / str(real).lstrip("/")
    assert json.loads((dry / "run.json").read_text())["status"] == "completed"


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint(out: Path, step: int, *markers: str) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for marker in markers:
        (folder / marker).write_text(json.dumps({"global_step": step}))
    return folder


def test_a_foreign_checkpoint_survives_resume(tmp_path):
    out = tmp_path / "run"
    args = SimpleNamespace(output_dir=str(out), should_save=True)
    checkpoint(out, 2, BEGUN_MARKER, COMPLETE_MARKER)
    checkpoint(out, 3, BEGUN_MARKER)  # ours, cut off while saving
    checkpoint(out, 1)  # copied in, below the start: left alone, never resumed
    assert resolve_resume(args, None) == str(out / "checkpoint-2")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2"]

    foreign = checkpoint(out, 7)  # a plain TRL checkpoint past the start: this run could save over it
    (foreign / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(PipelineError, match="holds checkpoint-7, which the pipeline did not write"):
        resolve_resume(args, None)
    with pytest.raises(PipelineError, match="checkpoint-7"):
        resolve_resume(args, False)  # starting afresh does not delete it either
    assert (foreign / "model.safetensors").read_bytes() == b"weights"
    # named, it is what the run starts from
    assert resolve_resume(args, str(foreign)) == str(foreign)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-7"]


def test_save_total_limit_rotates_only_the_pipelines_checkpoints(tmp_path, tiny_model_dir, task_data):
    from pipeline.stages import sft

    out = tmp_path / "run"
    outputs.claim(out, "sft")
    checkpoint(out, 0)  # copied into the run's folder
    sft.main(["--model_name_or_path", str(tiny_model_dir), "--train_data", task_data["sft_train"], *TRAIN,
              "--output_dir", str(out), "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1",
              "--save_total_limit", "1"])  # fmt: skip
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-3"]


# ------------------------------------------------------------------------------------------------ final model


def test_no_stale_adapter_after_a_full_model_save(tmp_path, tiny_model_dir, task_data):
    from transformers import AutoModelForCausalLM

    from pipeline.stages import sft

    out = tmp_path / "run"
    common = ["--model_name_or_path", str(tiny_model_dir), "--train_data", task_data["sft_train"], *TRAIN,
              "--output_dir", str(out), "--max_steps", "1", "--save_strategy", "no"]  # fmt: skip
    sft.main([*common, "--use_peft", "true", "--lora_target_modules", "all-linear"])
    assert (out / "adapter_config.json").is_file()
    sft.main([*common, "--resume_from_checkpoint", "false"])  # the same folder, now a full fine-tune
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert not (out / "adapter_model.safetensors").exists() and (out / FINAL_RECORD).is_file()
    AutoModelForCausalLM.from_pretrained(out)  # what generate/eval load: the new full model


def test_swap_in_final_model_of_an_older_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "run.json"):
        (out / name).write_text("old")
    checkpoint(out, 1, COMPLETE_MARKER)
    tmp = out / ".final.tmp"
    tmp.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp / name).write_text("new")
    swap_in_final_model(tmp, out)
    assert sorted(p.name for p in out.iterdir()) == [FINAL_RECORD, "checkpoint-1", "config.json",
                                                      "model.safetensors", "run.json", "tokenizer.json"]  # fmt: skip
    assert (out / "tokenizer.json").read_text() == "new" and (out / "run.json").read_text() == "old"


def test_the_scripts_refuse_names_that_would_leave_their_folder(tmp_path):
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    for script, argv in (("train.sh", ["data", "model", "../up", "reward", "resp", "none"]),
                         ("run_logp.sh", ["data", "model", "a/b"]),
                         ("train.sh", ["data", "model", "ref", "reward", "resp", ".."])):  # fmt: skip
        done = subprocess.run(["bash", str(repo / "scripts" / script), *argv], capture_output=True, text=True,
                              cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "dryrun": "1"})  # fmt: skip
        assert (
            done.returncode == 2 and "becomes part of a folder name" in done.stderr.strip().splitlines()[-1]
        )
        assert list(tmp_path.iterdir()) == []
