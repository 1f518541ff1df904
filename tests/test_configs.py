"""Recipe parsing: override order, unknown keys, and one-line errors for bad input."""

import os
from pathlib import Path

import pytest
from trl import ModelConfig, SFTConfig

from pipeline import cli
from pipeline.configs import DataArguments, parse_stage_args
from pipeline.data import load_yaml
from pipeline.errors import PipelineError

TYPES = (DataArguments, SFTConfig, ModelConfig)


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_override_order_default_then_yaml_then_cli(tmp_path):
    recipe = write(
        tmp_path,
        f"output_dir: {tmp_path}/out\nlearning_rate: 1.0e-3\nper_device_train_batch_size: 4\n"
        "lora_r: 8\ntrain_data: a.parquet\n",
    )
    data, train, model = parse_stage_args(TYPES, ["--config", recipe, "--learning_rate", "5e-4"], "sft")
    assert train.learning_rate == pytest.approx(5e-4)  # CLI beats YAML
    assert train.per_device_train_batch_size == 4  # YAML beats default (8)
    assert train.gradient_accumulation_steps == 1  # untouched default
    assert model.lora_r == 8 and data.train_data == "a.parquet"
    # without the flag the YAML value stands
    _, train, _ = parse_stage_args(TYPES, ["--config", recipe], "sft")
    assert train.learning_rate == pytest.approx(1e-3)


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads `1e-5` as a string; it must still become the float the field needs
    recipe = write(tmp_path, f"output_dir: {tmp_path}/o\nlearning_rate: 1e-5\n")
    _, train, _ = parse_stage_args(TYPES, ["--config", recipe], "sft")
    assert train.learning_rate == pytest.approx(1e-5)


def test_env_mapping_is_exported(tmp_path, monkeypatch):
    monkeypatch.delenv("PIPELINE_TEST_VAR", raising=False)
    recipe = write(tmp_path, f"output_dir: {tmp_path}/o\nenv:\n  PIPELINE_TEST_VAR: 7\n")
    parse_stage_args(TYPES, ["--config", recipe], "sft")
    assert os.environ["PIPELINE_TEST_VAR"] == "7"


def test_unknown_yaml_key_names_key_file_and_closest_field(tmp_path):
    recipe = write(tmp_path, f"output_dir: {tmp_path}/o\ngradient_accumulation_step: 4\n")
    with pytest.raises(PipelineError) as err:
        parse_stage_args(TYPES, ["--config", recipe], "sft")
    text = str(err.value)
    assert recipe in text
    assert "unknown key 'gradient_accumulation_step'" in text
    assert "did you mean 'gradient_accumulation_steps'?" in text


def test_unknown_cli_flag_suggests_closest_field(tmp_path):
    with pytest.raises(PipelineError, match=r"unknown key 'learnig_rate'; did you mean 'learning_rate'\?"):
        parse_stage_args(TYPES, ["--output_dir", str(tmp_path), "--learnig_rate", "1e-4"], "sft")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("learning_rate: fast\n", "'learning_rate' must be a number, got 'fast'"),
        ("per_device_train_batch_size: 2.5\n", "'per_device_train_batch_size' must be an integer"),
        ("packing: [1, 2]\n", "'packing' must be true or false"),
        ("output_dir: [a, b]\n", "'output_dir' must be a string"),
        ("lr_scheduler_type: sideways\n", "'lr_scheduler_type' must be one of"),
        ("model_name_or_path: x\n  bad: indent: here\n", "invalid YAML at line 2"),
        ("- just\n- a list\n", "a recipe must be a YAML mapping"),
    ],
)
def test_bad_recipe_values_give_one_line_exit_2(tmp_path, capsys, text, expected):
    recipe = write(tmp_path, text)
    code = cli.main(["sft", "--config", recipe, "--output_dir", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert recipe in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "never").exists()  # nothing written for a rejected recipe


def test_missing_recipe_file(tmp_path, capsys):
    assert cli.main(["sft", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml: recipe file not found" in err and len(err.strip().splitlines()) == 1


def test_bad_cli_value_is_one_line(tmp_path, capsys):
    assert cli.main(["sft", "--output_dir", str(tmp_path), "--num_train_epochs", "many"]) == 2
    err = capsys.readouterr().err
    assert "invalid float value: 'many'" in err and len(err.strip().splitlines()) == 1


def test_missing_training_data_is_one_line(tmp_path, capsys, tiny_model_dir):
    code = cli.main(
        ["sft", "--output_dir", str(tmp_path / "o"), "--model_name_or_path", str(tiny_model_dir),
         "--train_data", str(tmp_path / "missing.parquet")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "train_data: file not found" in err and "missing.parquet" in err
    assert not (tmp_path / "o").exists()  # nothing written for a run that could not start


def test_top_level_help_lists_stages(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for stage in ("sft", "tiny-model", "synthetic-data", "generate"):
        assert f"  {stage}" in out


def test_unknown_stage_suggests(capsys):
    assert cli.main(["sfft"]) == 2
    assert "did you mean 'sft'?" in capsys.readouterr().err


def test_stage_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sft", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--train_data", "--learning_rate", "--assistant_only_loss", "--lora_r", "--load_in_4bit"):
        assert flag in out


def test_str_or_bool_fields_take_both(tmp_path):
    _, train, _ = parse_stage_args(TYPES, ["--output_dir", str(tmp_path), "--include_num_input_tokens_seen",
                                           "non_padding"], "sft")  # fmt: skip
    assert train.include_num_input_tokens_seen == "non_padding"
    _, train, _ = parse_stage_args(TYPES, ["--output_dir", str(tmp_path), "--include_num_input_tokens_seen",
                                           "true"], "sft")  # fmt: skip
    assert train.include_num_input_tokens_seen in (True, "all")


@pytest.mark.parametrize("stage", ["sft", "logp", "ips"])
def test_missing_model_folder_is_one_line(tmp_path, capsys, stage):
    argv = [stage, "--model_name_or_path", str(tmp_path / "no_model"), "--output_dir", str(tmp_path / "o")]
    if stage == "sft":
        argv += ["--train_data", str(tmp_path / "x.parquet")]
    else:
        (tmp_path / "prepared").mkdir()
        (tmp_path / "prepared" / "manifest.json").write_text("{}")
        argv += ["--data_path", str(tmp_path / "prepared")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "model_name_or_path: folder not found" in err and len(err.strip().splitlines()) == 1, err


ALIAS_BOMB = "".join(
    f"{a}: &{a} [{', '.join([f'*{p}' if p != '-' else 'x'] * 9)}]\n"
    for p, a in zip("-abcdefg", "abcdefgh", strict=True)
)


def test_yaml_alias_bomb_is_refused_in_recipes_and_pipeline_files(tmp_path, capsys):
    import time

    assert len(ALIAS_BOMB) < 400  # stands for 9**8 = 43 million values once written out (e.g. into run.json)
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("learning_rate: 1.0e-5\n" + ALIAS_BOMB)
    start = time.monotonic()
    assert cli.main(["sft", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{recipe}: the YAML expands to more than 100,000 values" in err
        and len(err.strip().splitlines()) == 1
    )
    from pipeline.stages.run import load_pipeline

    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text(
        "output_dir: runs\nstages: []\nvars:\n"
        + "".join("  " + line + "\n" for line in ALIAS_BOMB.splitlines())
    )
    with pytest.raises(PipelineError, match="the YAML expands to more than 100,000 values"):
        load_pipeline(pipeline_file)
    assert time.monotonic() - start < 5
    # aliases that stay small still work
    recipe.write_text("defaults: &d {learning_rate: 2.0e-5}\nlearning_rate: 2.0e-5\n")
    from pipeline.data import load_yaml

    assert load_yaml(recipe.read_text(), str(recipe))["defaults"] == {"learning_rate": 2.0e-5}


RECIPES = sorted(Path(__file__).resolve().parents[1].glob("recipes/*/*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_parses_into_its_stage(recipe, monkeypatch):
    """As torchtune tests every shipped config: each recipe, read by its stage's own dataclasses (the file
    name is the stage), so a renamed or retyped field cannot silently break one. Validation that needs the
    recipe's hardware (bf16 on a GPU) is what the recipe's dry run covers (test_resilience.py)."""
    import importlib

    from pipeline.configs import RecipeParser

    if recipe.stem == "pipeline":  # a pipeline file: every stage and recipe it names must exist
        from pipeline.stages import run

        assert run.load_pipeline(recipe).stages
        return
    module = importlib.import_module(f"pipeline.stages.{recipe.stem}")
    keys = set(RecipeParser(module.CONFIG_CLASSES, prog=f"pipeline {recipe.stem}").valid_keys())
    fields = load_yaml(recipe.read_text(), str(recipe))
    for name in fields.pop("env", None) or {}:  # exported by the parser: restored after the test
        monkeypatch.setenv(name, os.environ.get(name, ""))
    assert set(fields) <= keys, sorted(set(fields) - keys)
    flags = ["--bf16", "false", "--tf32", "false"] if "bf16" in keys else []
    parsed = RecipeParser(module.CONFIG_CLASSES, prog=f"pipeline {recipe.stem}").parse(
        ["--config", str(recipe), *flags]
    )
    values = {k: v for config in parsed for k, v in vars(config).items()}
    for key, value in fields.items():
        if key in ("bf16", "tf32", "output_dir", "report_to") or isinstance(value, (dict, list)):
            continue
        got = values[key]
        got = getattr(got, "value", got)  # enums (lr_scheduler_type, ...) compare by their value
        assert got == value or str(got) == str(value), (key, value, got)
