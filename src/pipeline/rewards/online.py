"""The reward setup of the online RL stages (`grpo`, `rloo`, `ppo`) and of `eval`: `RewardArguments` (what
scores a completion), the reward functions built from them, and the prompt rows (with the columns each
reward reads) they score."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

logger = logging.getLogger("pipeline.rewards")


# reward name -> dataset columns it reads
REWARD_COLUMNS: dict[str, tuple[str, ...]] = {
    "code_execution": ("tests",),
    "humaneval": ("test", "entry_point"),
    "reward_model": (),
}


# columns a prompt can come from, in order of preference
PROMPT_SOURCES = ("prompt", "messages", "prompt_pretokenized")


@dataclass
class RewardArguments:
    """What scores the completions (shared by `pipeline grpo` and `pipeline rloo`)."""

    reward_funcs: str = field(
        default="code_execution",
        metadata={
            "help": "Comma-separated reward names: code_execution (row column `tests`), humaneval (columns "
            "`test`, `entry_point`), reward_model (the model in `reward_model_path`). Rewards are summed, "
            "weighted by `reward_weights`."
        },
    )
    reward_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Local folder of a scalar reward model (e.g. `pipeline rm` output), for reward_model."
        },
    )
    reward_timeout: float = field(
        default=5.0, metadata={"help": "Sandbox wall-clock seconds per completion (code rewards)."}
    )
    reward_workers: int | None = field(
        default=None, metadata={"help": "Parallel sandbox executions (code rewards). Default: CPU count."}
    )
    synthetic_task_seed: int | None = field(
        default=None,
        metadata={
            "help": "Prompt rows of the shipped synthetic task (task_id synth/NNNNN) without a `tests` column: "
            "regenerate the task with this seed (the one given to `pipeline synthetic-data`) and add each "
            "row's tests. Each prompt is checked against the regenerated problem."
        },
    )


def reward_names(args: RewardArguments) -> list[str]:
    names = [n.strip() for n in str(args.reward_funcs or "").split(",") if n.strip()]
    if not names:
        raise PipelineError(f"reward_funcs: give one or more of {', '.join(REWARD_COLUMNS)}")
    for name in names:
        if name not in REWARD_COLUMNS:
            raise PipelineError(
                f"reward_funcs: unknown reward '{name}' (choose from {', '.join(REWARD_COLUMNS)})"
            )
    if len(set(names)) != len(names):
        raise PipelineError(f"reward_funcs: '{args.reward_funcs}' names a reward twice")
    if "reward_model" in names:
        from pipeline.models import check_reward_model_dir

        check_reward_model_dir(args.reward_model_path)
    elif args.reward_model_path:
        raise PipelineError("reward_model_path is set but reward_funcs does not list reward_model")
    return names


class RewardModelFunction:
    """A scalar reward model as a TRL reward function: its inputs are built by
    `tokenization.reward_model_input_ids`, as `rm` trained it and as `ppo` and `eval` score with it (TRL's
    own rendering of prompt + completion differs: two assistant turns after an assistant prefix, no EOS
    after a text prompt)."""

    def __init__(self, tokenizer, model, name: str, batch_size: int = 8):
        from pipeline.judges.reward_model import RewardModelJudge

        self.scorer = RewardModelJudge(tokenizer, model.eval(), batch_size, cache=False)
        self.__name__ = name  # TRL logs rewards/<name>/mean
        self._placed = False

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        if not self._placed:  # on the device of this process, once
            from accelerate import PartialState

            self.scorer.model.to(PartialState().device)
            self._placed = True
        answers = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return self.scorer.score(list(prompts), answers)


def build_reward_funcs(names: list[str], args: RewardArguments, dtype: Any = None,
                       as_functions: bool = False) -> tuple[list, list]:  # fmt: skip
    """(reward functions, their processing classes) in TRL's `reward_funcs` form. `as_functions`: a reward
    model as a `RewardModelFunction` (GRPO/RLOO) rather than the module itself (`ppo` scores it alone)."""
    from pipeline.rewards.code import code_execution_reward, humaneval_reward

    options = {"timeout": args.reward_timeout, "workers": args.reward_workers}
    funcs: list = []
    processing: list = []
    for name in names:
        if name == "reward_model":
            from pipeline.models import load_reward_model

            kwargs = {"dtype": dtype} if dtype not in (None, "auto") else {}
            tokenizer, model = load_reward_model(args.reward_model_path, **kwargs)
            if hasattr(model, "merge_and_unload"):  # a LoRA adapter: scored as a plain model
                model = model.merge_and_unload()
            if as_functions:
                name_of = Path(args.reward_model_path.rstrip("/")).name
                funcs.append(RewardModelFunction(tokenizer, model, name_of))
                processing.append(None)
            else:
                funcs.append(model)
                processing.append(tokenizer)
        else:
            # partial keeps the wrapped name, so TRL logs rewards/code_execution_reward/mean etc.
            base = code_execution_reward if name == "code_execution" else humaneval_reward
            funcs.append(functools.partial(base, **options))
            processing.append(None)
    return funcs, processing


def _chat_prompt(value: Any, where: str) -> list[dict] | str:
    if isinstance(value, str):
        if not value.strip():
            raise PipelineError(f"{where}: empty prompt")
        return value
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value)
    ):
        raise PipelineError(
            f"{where}: a prompt must be text or a non-empty list of {{role, content}} messages"
        )
    return value


def _prompt_of_row(row: dict, source: str, where: str) -> list[dict] | str:
    value = row[source]
    if source == "prompt_pretokenized":
        try:
            value = json.loads(value)
        except (TypeError, ValueError):
            raise PipelineError(f"{where}: prompt_pretokenized is not a JSON chat") from None
    elif source == "messages":
        if not isinstance(value, list):
            raise PipelineError(f"{where}: messages must be a list of {{role, content}} messages")
        end = len(value)
        while end and isinstance(value[end - 1], dict) and value[end - 1].get("role") == "assistant":
            end -= 1
        value = value[:end]
    return _chat_prompt(value, where)


def _add_synthetic_tests(rows: list[dict], seed: int, what: str) -> None:
    from pipeline.tasks.synthetic import MAX_PROBLEMS, generate_problems

    problems = {p.task_id: p for p in generate_problems(MAX_PROBLEMS, seed)}
    for i, row in enumerate(rows):
        problem = problems.get(row.get("task_id"))
        if problem is None:
            raise PipelineError(
                f"{what}: row {i} has task_id {row.get('task_id')!r}, not one of the synthetic task's"
            )
        prompt = row["prompt"]
        text = (
            prompt
            if isinstance(prompt, str)
            else next((m["content"] for m in prompt if m["role"] == "user"), "")
        )
        if text != problem.prompt:
            raise PipelineError(
                f"{what}: row {i} ({problem.task_id}) is not the synthetic task's problem for seed {seed}; set "
                "synthetic_task_seed to the --seed given to `pipeline synthetic-data`"
            )
        row["tests"] = list(problem.tests)


def prompt_dataset(dataset, what: str, names: list[str], args: RewardArguments):
    """A TRL prompt dataset (`prompt` column + the columns the rewards read) from loaded rows.

    Checks every row; problems are one-line `PipelineError`s naming `what` (e.g. train_data)."""
    import datasets

    columns = list(dataset.column_names)
    source = next((c for c in PROMPT_SOURCES if c in columns), None)
    if source is None:
        raise PipelineError(
            f"{what}: no prompt column: need one of {', '.join(PROMPT_SOURCES)}; found {', '.join(columns)}"
        )
    rows, seen = [], set()
    for i, row in enumerate(dataset):
        prompt = _prompt_of_row(row, source, f"{what} row {i}")
        if source != "prompt":  # rows that carry responses: one row per distinct prompt
            key = json.dumps(prompt, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            row = {k: v for k, v in row.items() if k != source}
        rows.append({**row, "prompt": prompt})
    if "code_execution" in names and "tests" not in columns:
        if args.synthetic_task_seed is None:
            raise PipelineError(
                f"{what}: no `tests` column, which reward code_execution needs (for the synthetic task's files "
                "set synthetic_task_seed to the --seed given to `pipeline synthetic-data`)"
            )
        _add_synthetic_tests(rows, args.synthetic_task_seed, what)
    for name in names:
        missing = [c for c in REWARD_COLUMNS[name] if c not in rows[0]]
        if missing:
            raise PipelineError(f"{what}: no `{missing[0]}` column, which reward {name} needs")
    if "code_execution" in names and not any(r["tests"] for r in rows):
        raise PipelineError(f"{what}: every row's `tests` is empty; code_execution has nothing to run")
    return datasets.Dataset.from_list(rows)
