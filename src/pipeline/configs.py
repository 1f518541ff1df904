"""Our config dataclasses (thin subclasses of TRL's) and the recipe parser every stage uses.

A recipe is one flat YAML mapping whose keys are fields of the stage's dataclasses. `RecipeParser` is TRL's
`TrlParser` (YAML values become defaults, CLI flags override them, an `env:` mapping is exported) plus the
checks a user needs before hours of compute start: unknown keys are errors naming the file and the closest
valid field, values are type-checked, and every problem is one line (a `PipelineError`) instead of a
traceback or a screen of argparse usage.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import yaml
from trl import ModelConfig, ScriptArguments, TrlParser

from pipeline.data import load_yaml
from pipeline.errors import PipelineError


@dataclass
class StageOptions:
    """Options every training stage shares (through `DataArguments`, or its own config for IPS)."""

    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Test the recipe on a laptop: a tiny random model (and reward model) replaces the recipe's, "
            "2 steps on at most 16 rows, fp32 on the CPU, no tracker, written to dry_runs/<output_dir> "
            "(or the --output_dir given on the command line). The model paths need not exist; data must."
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={
            "help": "With use_peft: save the final model with the LoRA adapter merged into its base (a plain "
            "model for from_pretrained); the adapter is kept in <output_dir>/adapter."
        },
    )
    save_every_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Also save a checkpoint about every this many minutes (the step interval is measured "
            "after 10 steps; every rank saves at the same steps), whatever save_strategy says. "
            "scripts/train.sh sets 30."
        },
    )


@dataclass
class DataArguments(ScriptArguments, StageOptions):
    """TRL's `ScriptArguments` plus local data files (parquet/jsonl/json), which is how our stages exchange data."""

    train_data: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a parquet/jsonl/json file, a glob, a comma-separated list, or a folder of "
            "such files. Takes precedence over `dataset_name`."
        },
    )
    eval_data: str | None = field(
        default=None,
        metadata={"help": "Evaluation data, same forms as `train_data`. Evaluation is skipped when absent."},
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use only the first N training rows (after shuffling with `seed`). Default: all rows."
        },
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N evaluation rows. Default: all rows."}
    )


def _strip_optional(tp: Any) -> tuple[Any, tuple]:
    """Return (base type, union members) of an annotation such as `int | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = tuple(a for a in typing.get_args(tp) if a is not type(None))
        return (members[0] if len(members) == 1 else None), members
    return tp, (tp,)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


# `str` fields that also take true/false (TrainingArguments types resume_from_checkpoint as a path only)
STR_OR_BOOL_KEYS = {"resume_from_checkpoint"}


def check_value(key: str, annotation: Any, value: Any) -> str | None:
    """Return an error text if `value` (from YAML) cannot be a value of the field's annotation, else None."""
    if value is None or (key in STR_OR_BOOL_KEYS and isinstance(value, bool)):
        return None
    base, members = _strip_optional(annotation)
    if base is None:  # a real union: `SchedulerType | str` is still an enum; `dict | str` accepts anything
        enums = [m for m in members if isinstance(m, type) and issubclass(m, Enum)]
        if not enums:
            return None
        base = enums[0]
    origin = typing.get_origin(base)
    if base is bool:
        if isinstance(value, bool) or (
            isinstance(value, str) and value.lower() in ("true", "false", "yes", "no")
        ):
            return None
        return f"'{key}' must be true or false, got {_describe(value)}"
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return None
        if isinstance(value, str):
            try:
                int(value)
                return None
            except ValueError:
                pass
        return f"'{key}' must be an integer, got {_describe(value)}"
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if isinstance(value, str):
            try:
                float(value)
                return None
            except ValueError:
                pass
        return f"'{key}' must be a number, got {_describe(value)}"
    if isinstance(base, type) and issubclass(base, Enum):
        allowed = [e.value for e in base]
        if value in allowed or str(value) in [str(a) for a in allowed]:
            return None
        return f"'{key}' must be one of {allowed}, got {value!r}"
    if origin is typing.Literal:
        allowed = typing.get_args(base)
        if value in allowed:
            return None
        return f"'{key}' must be one of {list(allowed)}, got {value!r}"
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return None
        return f"'{key}' must be a string, got {_describe(value)}"
    if origin is list and isinstance(value, dict):
        return f"'{key}' must be a list, got a mapping"
    return None


def _str_or_bool(value: str) -> str | bool:
    low = value.lower()
    if low in ("true", "yes", "t", "y", "1"):
        return True
    if low in ("false", "no", "f", "n", "0"):
        return False
    return value


def join_negative_values(args: list[str]) -> list[str]:
    """`--reward_clip -1.5,1.5` → `--reward_clip=-1.5,1.5`: argparse would read the value as a flag."""
    out: list[str] = []
    for arg in args:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.match(r"^-\d", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def read_recipe_file(path: str) -> dict[str, Any]:
    """A recipe file's mapping ({} when empty); a missing file, bad YAML or a non-mapping is one line."""
    if not os.path.isfile(path):
        raise PipelineError(f"{path}: recipe file not found")
    try:
        with open(path) as fh:
            recipe = load_yaml(fh.read(), path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise PipelineError(f"{path}: invalid YAML{where}: {problem}") from None
    except OSError as err:
        raise PipelineError(f"{path}: cannot read recipe: {err.strerror}") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise PipelineError(
            f"{path}: a recipe must be a YAML mapping of field: value, got {type(recipe).__name__}"
        )
    return recipe


class RecipeParser(TrlParser):
    """`TrlParser` with one-line errors, unknown-key suggestions and YAML type checks."""

    def __init__(self, dataclass_types, prog: str, **kwargs):
        super().__init__(dataclass_types, prog=prog, **kwargs)
        self._annotations: dict[str, Any] = {}
        for dc in self.dataclass_types:
            hints = typing.get_type_hints(dc)
            for f in dataclasses.fields(dc):
                if f.init:
                    self._annotations[f.name] = hints.get(f.name, f.type)
        # HfArgumentParser parses `str | bool` fields (e.g. include_num_input_tokens_seen) as booleans only,
        # which rejects their documented string values; accept both
        for action in self._actions:
            _, members = _strip_optional(self._annotations.get(action.dest))
            if str in members and bool in members:
                action.type = _str_or_bool

    # argparse calls error() for bad flags/values; it normally prints the whole usage and exits.
    def error(self, message: str):
        raise PipelineError(f"{message} (see `{self.prog} --help`)")

    def valid_keys(self) -> list[str]:
        return [a.dest for a in self._actions if a.dest not in ("help", "config")]

    def _unknown(self, key: str, where: str) -> PipelineError:
        close = difflib.get_close_matches(key, self.valid_keys(), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return PipelineError(f"{where}: unknown key '{key}'{hint} (see `{self.prog} --help` for every field)")

    def load_recipe(self, path: str) -> dict[str, Any]:
        """Read, validate and return a recipe mapping (the `env:` entry included, untouched)."""
        recipe = read_recipe_file(path)
        env = recipe.get("env", {})
        if not isinstance(env, dict):
            raise PipelineError(f"{path}: 'env' must be a mapping of VARIABLE: value")
        valid = set(self.valid_keys())
        for key, value in recipe.items():
            if key == "env":
                continue
            if key not in valid:
                raise self._unknown(str(key), path)
            problem = check_value(key, self._annotations.get(key), value)
            if problem:
                raise PipelineError(f"{path}: {problem}")
        return recipe

    def _default_distributed_cpu_ranks(self, args: list[str]) -> None:
        """Ranks started by `accelerate launch`/`torchrun` on a machine without a GPU. accelerate only
        treats them as data-parallel ranks when told so: DeepSpeed ranks need the gloo backend (else it
        counts a single process: no data sharding, failing metric gathers), plain DDP ranks need use_cpu
        (else each rank trains alone). Fields the recipe or command line sets are left alone."""
        if os.environ.get("LOCAL_RANK") is None:
            return
        import torch

        if torch.cuda.is_available():
            return
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        field, value = ("ddp_backend", "gloo") if deepspeed else ("use_cpu", True)
        action = next((a for a in self._actions if a.dest == field), None)
        if action is None or any(a.split("=")[0] == f"--{field}" for a in args):
            return
        if action.default in (None, False):
            action.default = value

    def _default_bf16_to_hardware(self, args: list[str]) -> None:
        """TRL turns bf16 on whenever it is not set, which fails on a CPU or pre-Ampere GPU.

        When neither the recipe nor the command line sets `bf16`, use it only where the hardware has it.
        """
        action = next((a for a in self._actions if a.dest == "bf16"), None)
        if action is None or action.default is not None or any(a.split("=")[0] == "--bf16" for a in args):
            return
        import torch

        action.default = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())

    def parse(self, argv: list[str] | None) -> tuple:
        """Parse `[--config recipe.yaml] [--field value ...]` into the dataclasses, in declaration order."""
        args = list(argv or [])
        recipe: dict[str, Any] = {}
        for i, arg in enumerate(args):
            if arg == "--config" or arg.startswith("--config="):
                if arg == "--config":
                    if i + 1 >= len(args):
                        raise PipelineError("--config needs a path to a YAML recipe")
                    path = args[i + 1]
                    del args[i : i + 2]
                else:
                    path = arg.split("=", 1)[1]
                    del args[i]
                recipe = self.load_recipe(path)
                break
        for key, value in (recipe.pop("env", None) or {}).items():
            os.environ[str(key)] = str(value)
        self.set_defaults_with_config(**recipe)
        args = join_negative_values(args)
        self._default_bf16_to_hardware(args)
        self._default_distributed_cpu_ranks(args)
        try:
            # fail on unknown flags ourselves so the message can suggest the closest field
            *parsed, remaining = self.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
        except PipelineError:
            raise
        except (ValueError, TypeError) as err:  # dataclass __post_init__ validation (TRL/transformers)
            raise PipelineError(str(err).strip().splitlines()[0]) from None
        flags = [r for r in remaining if r.startswith("--")]
        if flags:
            raise self._unknown(flags[0][2:].split("=")[0], "command line")
        if remaining:
            raise PipelineError(f"unexpected argument '{remaining[0]}' (see `{self.prog} --help`)")
        move_tokens_to_environment(parsed)
        return tuple(parsed)


def move_tokens_to_environment(parsed) -> None:
    """`hub_token` (and a `token` string in `model_init_kwargs`) move to HF_TOKEN, where huggingface_hub
    reads them: the arguments the Trainer pickles into every checkpoint (`training_args.bin`) and the run
    records then hold no key."""
    for config in parsed:
        if getattr(config, "hub_token", None):
            os.environ["HF_TOKEN"] = config.hub_token
            config.hub_token = None
        kwargs = getattr(config, "model_init_kwargs", None)
        if isinstance(kwargs, dict) and isinstance(kwargs.get("token"), str):
            os.environ["HF_TOKEN"] = kwargs.pop("token")


def parse_stage_args(dataclass_types: tuple, argv: list[str] | None, stage: str) -> tuple:
    """Parse a stage's recipe + flags into instances of `dataclass_types`.

    With `dry_run: true` the recipe is parsed again with the dry run's settings appended as flags
    (`pipeline.training.dry_run_flags`), so every dataclass validates the values it will run with."""
    parser = RecipeParser(dataclass_types, prog=f"pipeline {stage}")
    argv = list(argv or [])
    if "dry_run" not in parser.valid_keys() or not dry_run_requested(parser, argv):
        return refuse_non_positive(parser.parse(argv))
    from pipeline.training import dry_run_flags, dry_run_hardware_flags

    keys = set(parser.valid_keys())
    argv = [*argv, *dry_run_hardware_flags(keys)]
    parsed = parser.parse(argv)
    flags = dry_run_flags(parsed, keys, stage)
    return refuse_non_positive(RecipeParser(dataclass_types, prog=f"pipeline {stage}").parse([*argv, *flags]))


POSITIVE_FIELDS = ("max_train_samples", "max_eval_samples", "save_every_minutes")


def refuse_non_positive(parsed: tuple) -> tuple:
    """Sizes and budgets that are set must be positive (0 rows, or a checkpoint every -1 minutes, would
    train on nothing or never save without saying so)."""
    for config in parsed:
        for name in POSITIVE_FIELDS:
            value = getattr(config, name, None)
            if value is not None and value <= 0:
                raise PipelineError(f"{name} must be positive, got {value} (leave it unset to turn it off)")
    return parsed


def dry_run_requested(parser: RecipeParser, argv: list[str]) -> bool:
    """`dry_run` from the recipe or the command line, read before parsing: the dry run's CPU settings must
    be in place when the dataclasses validate (a cluster recipe's `bf16: true` fails on a laptop)."""
    value: Any = False
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            value = parser.load_recipe(argv[i + 1]).get("dry_run", value)
        elif arg.startswith("--config="):
            value = parser.load_recipe(arg.split("=", 1)[1]).get("dry_run", value)
    for i, arg in enumerate(argv):
        if arg == "--dry_run":
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
        elif arg.startswith("--dry_run="):
            value = arg.split("=", 1)[1]
    return value is True or str(value).lower() in ("true", "yes", "t", "y", "1")


__all__ = ["DataArguments", "ModelConfig", "RecipeParser", "StageOptions", "check_value", "parse_stage_args"]
