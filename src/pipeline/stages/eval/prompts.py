"""The prompts: the synthetic task's held-out problems, HumanEval, or prompt files; rendered with a chat template."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from pipeline.data import load_files
from pipeline.errors import PipelineError
from pipeline.stages.eval.config import ID_COLUMNS, PROMPT_SOURCES, EvalConfig, PromptItem

logger = logging.getLogger("pipeline.eval")


def _prompt_key(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages = [{"role": m["role"], "content": m["content"]} for m in value]
    if any(not isinstance(m["content"], str) for m in messages):
        raise PipelineError(f"{where}: every message's content must be text")
    return messages


def load_prompts(cfg: EvalConfig) -> list[PromptItem]:
    """The prompt set, checked row by row; tests attached where the code scorer needs them."""
    if cfg.synthetic_num_problems is not None:
        from pipeline.tasks.synthetic import generate_problems, split_problems

        seed = cfg.synthetic_task_seed or 0
        try:
            _, held_out = split_problems(
                generate_problems(cfg.synthetic_num_problems, seed), cfg.synthetic_eval_fraction, seed
            )
        except ValueError as err:
            raise PipelineError(f"synthetic_num_problems / synthetic_eval_fraction: {err}") from None
        items = [
            PromptItem(p.task_id, [{"role": "user", "content": p.prompt}], "", tests=list(p.tests))
            for p in held_out
        ]
    else:
        items = _prompts_from_files(cfg)
    if cfg.max_prompts is not None:
        items = items[: cfg.max_prompts]
    unique: dict[str, PromptItem] = {}
    for item in items:
        item.key = _prompt_key(item.messages)
        unique.setdefault(item.key, item)
    if len(unique) < len(items):
        logger.info("eval: %d repeated prompts evaluated once", len(items) - len(unique))
    items = list(unique.values())
    if not items:
        raise PipelineError("no prompts to evaluate")
    ids = [it.prompt_id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PipelineError(
            f"prompts: id '{dup}' names two different prompts; set id_column to a unique column"
        )
    return items


def _prompts_from_files(cfg: EvalConfig) -> list[PromptItem]:
    from pipeline.rewards.online import RewardArguments, prompt_dataset

    spec = cfg.prompts
    rows = load_files(spec, "prompts")
    columns = list(rows.column_names)
    if cfg.prompt_column is not None:
        if cfg.prompt_column not in PROMPT_SOURCES:
            raise PipelineError(
                f"prompt_column: must be one of {', '.join(PROMPT_SOURCES)}, got '{cfg.prompt_column}'"
            )
        if cfg.prompt_column not in columns:
            raise PipelineError(
                f"prompts: '{spec}' has no column '{cfg.prompt_column}' (prompt_column); columns are {columns}"
            )
        others = [c for c in PROMPT_SOURCES if c in columns and c != cfg.prompt_column]
        rows = rows.remove_columns(others)
        columns = list(rows.column_names)
    if not any(c in columns for c in PROMPT_SOURCES):
        raise PipelineError(
            f"prompts: '{spec}' has no prompt column: need one of {', '.join(PROMPT_SOURCES)}; columns are {columns}"
        )
    id_column = cfg.id_column
    if id_column is not None and id_column not in columns:
        raise PipelineError(
            f"prompts: '{spec}' has no column '{id_column}' (id_column); columns are {columns}"
        )
    if id_column is None:
        id_column = next((c for c in ID_COLUMNS if c in columns), None)
    names: list[str] = []
    if "code" in cfg.scorers:
        if "tests" in columns or cfg.synthetic_task_seed is not None:
            names = ["code_execution"]
        elif "test" in columns and "entry_point" in columns:
            names = ["humaneval"]
        else:
            raise PipelineError(
                f"prompts: '{spec}' has no `tests` column (a list of assert statements), which scorer code needs; "
                "HumanEval-format rows need `test` and `entry_point`; for the synthetic task's files set "
                "synthetic_task_seed"
            )
    # grpo's prompt reader: checks every row, one row per distinct prompt, synthetic tests by task_id
    dataset = prompt_dataset(
        rows, "prompts", names, RewardArguments(synthetic_task_seed=cfg.synthetic_task_seed)
    )
    items = []
    for i, row in enumerate(dataset):
        messages = _messages(row["prompt"], f"prompts row {i}")
        key = _prompt_key(messages)
        prompt_id = str(row[id_column]) if id_column and row.get(id_column) is not None else f"p-{key[:12]}"
        item = PromptItem(prompt_id, messages, key)
        if names == ["code_execution"]:
            item.tests = list(row["tests"] or [])
        elif names == ["humaneval"]:
            item.humaneval = {k: row.get(k) for k in ("test", "entry_point", "code_prompt")}
        items.append(item)
    return items


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """What the model continues: the chat template with a generation prompt, then any assistant prefix."""
    from pipeline.tokenization import render_prompt

    if len(messages) <= 2 and messages[0]["role"] == "user" and messages[-1]["role"] in ("user", "assistant"):
        return render_prompt(tokenizer, messages)  # the tokenization every other stage uses
    if messages[-1]["role"] == "assistant":
        head = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        return head + messages[-1]["content"]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
