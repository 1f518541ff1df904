"""Evaluation stage: generate answers from one or more models, score them, report pass@k and win-rates.

    pipeline eval --config recipes/demo/eval.yaml [--num_samples 5 --temperature 0.8 --output_dir runs/x ...]
    pipeline eval --models runs/demo/sft runs/demo/ips --synthetic_num_problems 520 --output_dir runs/ev

Prompts: `prompts` (a parquet/jsonl/json file, glob or folder) with a chat `prompt` (message list or text),
`messages` (the conversation up to its last non-assistant turn) or `prompt_pretokenized` (a JSON chat whose
optional final assistant message is a prefix the answer continues) column, the first found unless
`prompt_column` says which; or the synthetic task's held-out problems (`synthetic_num_problems`, the
`--num_problems` given to `pipeline synthetic-data`, with its seed and eval fraction). Repeated prompts are
evaluated once. A prompt's id is its `prompt_id`/`task_id`/`id` column (or `id_column`), else a hash.

Models (`models`, space-separated on the command line): local folders, full models or LoRA adapters, named
by `model_names` (default: the folder names). Each model answers every prompt `num_samples` times, in
batches of `batch_size` prompts, greedily (`temperature: 0`) or sampled (`temperature`, `top_p`, `top_k`),
at most `max_new_tokens` tokens, seeded per batch; the recipe's sampling settings replace the model's own
generation defaults. Answers are cached in `answers_cache` (default `<output_dir>/answers`), one parquet per
(model fingerprint: config, weights and tokenizer; sampling settings), keyed by prompt hash and sample
index: a rerun (new scorers, another judge) loads them instead of generating, and so does a second entry
of the same model.

Scorers (`scorers`):
- `code`: each answer (one code fence stripped) runs in the sandbox against its prompt's `tests` (a list of
  asserts; the synthetic task's problems carry them, `synthetic_task_seed` adds them to the task's files by
  task_id) or HumanEval's `test` + `entry_point` (+ optional `code_prompt`); it passes when every test
  does. pass@k for each k in `pass_k` is the unbiased estimator 1 - C(n-c, k)/C(n, k) per prompt.
- `reward_model`: the mean score of a prompt's answers under the reward model in `reward_model_path`.
- `pairwise_judge`: every model against `baseline` (default the first model), answer i against answer i,
  judged in both orders so position bias cancels (`pipeline.judges`). `judge: reward_model` (the model in
  `reward_model_path`) or `judge: openai`: any OpenAI-compatible endpoint (`judge_base_url`, `judge_model`;
  the key is read from the environment variable named by `judge_api_key_env`, never logged, and sent only
  to that origin over https or on this machine, never after a redirect). Requests time out after
  `judge_timeout` s and are retried `judge_max_retries` times with exponential back-off (and `Retry-After`);
  a dead endpoint is one line, before anything is generated. Every verdict is kept in
  `<answers_cache>/judge_verdicts.jsonl` as it arrives, so a rerun after a failure asks only what is
  missing (`judge_cached` counts the verdicts reused). A reply without a verdict is an invalid judgement,
  counted (`invalid`) and left out; a reply that is not a chat completion is an error.

Writes to `output_dir`, each file under a temporary name then renamed: `eval.csv` (one row per model and
prompt: pass counts, pass@k, reward, win-rate against the baseline), `eval.json` (the same rows, aggregates
with bootstrap 95% intervals over prompts, seeded by `seed`, judge statistics, model fingerprints),
`eval_samples.parquet` (every answer with its scores), `run.json` and `run.log`. `report_to: wandb` logs the
aggregates and the per-prompt table to W&B (offline unless WANDB_API_KEY is set). Bad input (no prompt
column, a model folder that does not exist, k > num_samples, ...) is one line before anything is written.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import outputs
from pipeline.configs import parse_stage_args
from pipeline.data import load_files, sha256_file, write_parquet_atomic
from pipeline.errors import PipelineError
from pipeline.judges import (
    DEFAULT_JUDGE_TEMPLATE,
    OpenAIJudge,
    PairResult,
    PairwiseJudge,
    RewardModelJudge,
    judge_both_orders,
)
from pipeline.models import check_model_dir
from pipeline.runinfo import RunInfo, atomic_write_text, config_dict, setup_logging, setup_tracking
from pipeline.stats import bootstrap, pass_at_k_of, stable_seed

logger = logging.getLogger("pipeline.eval")

SCORERS = ("code", "reward_model", "pairwise_judge")
JUDGES = ("reward_model", "openai")
ID_COLUMNS = ("prompt_id", "task_id", "id")
PROMPT_SOURCES = ("prompt", "messages", "prompt_pretokenized")
CACHE_FLUSH_PROMPTS = 64  # answers are written to the cache at least this often (in prompts)


@dataclass
class EvalConfig:
    """Everything `pipeline eval` reads (see the module docstring)."""

    models: list[str] = field(
        default_factory=list,
        metadata={"help": "Model folders to evaluate (full models or LoRA adapters), space-separated."},
    )
    model_names: list[str] = field(
        default_factory=list,
        metadata={"help": "A name per model for the reports. Default: the folder names."},
    )
    baseline: str | None = field(
        default=None,
        metadata={
            "help": "Name of the model the others are judged against (pairwise_judge). Default: the first."
        },
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Folder for eval.csv, eval.json, run.json."}
    )
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Prompt file(s): parquet/jsonl/json with a prompt, messages or prompt_pretokenized column."
        },
    )
    prompt_column: str | None = field(
        default=None,
        metadata={
            "help": "Which column holds the prompt (prompt, messages or prompt_pretokenized). Default: the first found."
        },
    )
    id_column: str | None = field(
        default=None,
        metadata={
            "help": "Column with each prompt's id. Default: prompt_id, task_id or id if present, else a hash."
        },
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Evaluate only the first N prompts."})
    synthetic_num_problems: int | None = field(
        default=None,
        metadata={
            "help": "Instead of `prompts`: the held-out problems of the synthetic task exported with this "
            "--num_problems (with synthetic_task_seed, default 0, and synthetic_eval_fraction)."
        },
    )
    synthetic_task_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the synthetic task (the --seed of `pipeline synthetic-data`). Also adds each row's "
            "tests, by task_id, to prompt files of the task that have no `tests` column."
        },
    )
    synthetic_eval_fraction: float = field(
        default=0.1, metadata={"help": "The --eval_fraction of `pipeline synthetic-data` (held-out share)."}
    )
    scorers: list[str] = field(
        default_factory=lambda: ["code"],
        metadata={"help": "Any of: code (sandboxed pass@k), reward_model, pairwise_judge. Space-separated."},
    )
    num_samples: int = field(default=1, metadata={"help": "Answers per prompt and model (n of pass@k)."})
    temperature: float = field(
        default=0.0, metadata={"help": "Sampling temperature; 0 means greedy decoding."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (sampling only)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off; sampling only)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer, in tokens."})
    batch_size: int = field(
        default=8,
        metadata={"help": "Prompts per generation batch (each with num_samples answers); also RM batch."},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "float32, bfloat16, float16, or auto: bfloat16 on a GPU that has it, else float32."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of sampling (per batch) and of the bootstrap."})
    answers_cache: str | None = field(
        default=None,
        metadata={"help": "Folder caching generated answers across runs. Default: <output_dir>/answers."},
    )
    pass_k: list[int] = field(
        default_factory=lambda: [1], metadata={"help": "k values of pass@k (each <= num_samples)."}
    )
    code_timeout: float = field(default=5.0, metadata={"help": "Sandbox wall-clock seconds per answer."})
    code_workers: int | None = field(
        default=None, metadata={"help": "Parallel sandbox executions. Default: CPU count."}
    )
    reward_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Scalar reward model folder (`pipeline rm` output) for reward_model / judge reward_model."
        },
    )
    reward_max_length: int | None = field(
        default=None,
        metadata={"help": "Truncate reward-model inputs to this many tokens. Default: no limit."},
    )
    judge: str = field(
        default="reward_model",
        metadata={
            "help": "Pairwise judge: reward_model (reward_model_path) or openai (an OpenAI-compatible endpoint)."
        },
    )
    judge_base_url: str | None = field(
        default=None,
        metadata={
            "help": "Endpoint base URL, up to where /chat/completions starts (e.g. http://localhost:8000/v1)."
        },
    )
    judge_model: str | None = field(default=None, metadata={"help": "Model name the judge endpoint serves."})
    judge_api_key_env: str | None = field(
        default="OPENAI_API_KEY",
        metadata={
            "help": "NAME of the environment variable holding the judge's API key (unset: no key sent)."
        },
    )
    judge_timeout: float = field(default=60.0, metadata={"help": "Seconds one judge request may take."})
    judge_max_retries: int = field(
        default=3, metadata={"help": "Retries of a failed judge request (network, timeout, 429, 5xx)."}
    )
    judge_backoff: float = field(
        default=1.0, metadata={"help": "First wait between judge retries, in seconds; doubled each time."}
    )
    judge_allow_http_key: bool = field(
        default=False,
        metadata={
            "help": "Send the judge's key over plain http to another machine (by default only https, or "
            "http to this machine, gets it)."
        },
    )
    judge_concurrency: int = field(default=4, metadata={"help": "Judge requests in flight at once."})
    judge_max_tokens: int = field(default=16, metadata={"help": "max_tokens of each judge request."})
    judge_template: str | None = field(
        default=None,
        metadata={
            "help": "The judge's instruction with {prompt}, {answer_a} and {answer_b}; it must ask for the letter "
            "A or B first. Default: pipeline.judges.DEFAULT_JUDGE_TEMPLATE."
        },
    )
    judge_skip_identical: bool = field(
        default=True,
        metadata={"help": "Score two identical answers as a tie without asking the judge."},
    )
    bootstrap_samples: int = field(
        default=1000, metadata={"help": "Bootstrap resamples of the prompts for 95%% intervals (0: none)."}
    )
    report_to: str = field(
        default="none",
        metadata={"help": "none or wandb (offline into output_dir unless WANDB_API_KEY is set)."},
    )
    run_name: str | None = field(
        default=None, metadata={"help": "Tracker run name. Default: output_dir's name."}
    )


@dataclass
class PromptItem:
    prompt_id: str
    messages: list[dict[str, str]]
    key: str  # hash of the messages: the cache key
    tests: list[str] | None = None
    humaneval: dict[str, Any] | None = None  # test, entry_point, code_prompt


@dataclass
class ModelSpec:
    name: str
    path: str
    fingerprint: str = ""
    generated: int = 0  # prompts generated in this run (the rest came from the cache)


# ------------------------------------------------------------------------------------------ config checks


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, (str, int, float)) else list(value)


def check_config(cfg: EvalConfig) -> None:
    """Every setting that can be checked without touching a file; one line per problem."""
    cfg.models = [str(m) for m in _as_list(cfg.models)]
    cfg.model_names = [str(m) for m in _as_list(cfg.model_names)]
    cfg.scorers = [str(s) for s in _as_list(cfg.scorers)]
    try:
        cfg.pass_k = sorted({int(k) for k in _as_list(cfg.pass_k)})
    except ValueError:
        raise PipelineError(f"pass_k: expected integers, got {cfg.pass_k!r}") from None
    if not cfg.output_dir:
        raise PipelineError("output_dir is required (the folder for eval.csv, eval.json and run.json)")
    if not cfg.models:
        raise PipelineError("models: give one or more model folders (`--models DIR [DIR ...]`)")
    if cfg.model_names and len(cfg.model_names) != len(cfg.models):
        raise PipelineError(f"model_names: {len(cfg.model_names)} names for {len(cfg.models)} models")
    if not cfg.scorers:
        raise PipelineError(f"scorers: give one or more of {', '.join(SCORERS)}")
    for name in cfg.scorers:
        if name not in SCORERS:
            raise PipelineError(f"scorers: unknown scorer '{name}' (choose from {', '.join(SCORERS)})")
    if (cfg.prompts is None) == (cfg.synthetic_num_problems is None):
        raise PipelineError(
            "set exactly one of `prompts` (a file) and `synthetic_num_problems` (held-out problems)"
        )
    if cfg.num_samples < 1 or cfg.max_new_tokens < 1 or cfg.batch_size < 1:
        raise PipelineError("num_samples, max_new_tokens and batch_size must be >= 1")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1 or cfg.top_k < 0:
        raise PipelineError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")
    if cfg.temperature == 0 and cfg.num_samples > 1:
        raise PipelineError(
            f"num_samples={cfg.num_samples} with greedy decoding (temperature 0) gives identical answers; "
            "set temperature > 0 or num_samples 1"
        )
    if "code" in cfg.scorers:
        if not cfg.pass_k or cfg.pass_k[0] < 1:
            raise PipelineError("pass_k: give positive integers")
        if cfg.pass_k[-1] > cfg.num_samples:
            raise PipelineError(
                f"pass_k: k={cfg.pass_k[-1]} needs at least that many answers per prompt; raise num_samples "
                f"(now {cfg.num_samples})"
            )
    if cfg.code_timeout <= 0:
        raise PipelineError("code_timeout must be > 0")
    if cfg.judge not in JUDGES:
        raise PipelineError(f"judge: unknown judge '{cfg.judge}' (choose from {', '.join(JUDGES)})")
    if "pairwise_judge" in cfg.scorers and len(cfg.models) < 2:
        raise PipelineError("pairwise_judge needs two or more models (list the baseline too)")
    if needs_reward_model(cfg) and not cfg.reward_model_path:
        raise PipelineError("reward_model_path is required by scorer reward_model and by judge reward_model")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise PipelineError(f"dtype: '{cfg.dtype}' is not one of auto, float32, bfloat16, float16")
    if cfg.report_to not in ("none", "wandb"):
        raise PipelineError(f"report_to: '{cfg.report_to}' is not supported by eval (none or wandb)")
    if cfg.bootstrap_samples < 0:
        raise PipelineError("bootstrap_samples must be >= 0")


def needs_reward_model(cfg: EvalConfig) -> bool:
    return "reward_model" in cfg.scorers or ("pairwise_judge" in cfg.scorers and cfg.judge == "reward_model")


def model_specs(cfg: EvalConfig) -> list[ModelSpec]:
    names = cfg.model_names or [Path(m.rstrip("/")).name or m for m in cfg.models]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise PipelineError(f"models: two models are named '{dup}'; give distinct model_names")
    for path in cfg.models:
        check_model_dir(path, "models")
    if cfg.baseline is not None and cfg.baseline not in names:
        raise PipelineError(f"baseline: '{cfg.baseline}' is not a model name ({', '.join(names)})")
    return [ModelSpec(n, p) for n, p in zip(names, cfg.models, strict=True)]


# ------------------------------------------------------------------------------------------ prompts


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


# ------------------------------------------------------------------------------------------ generation


_HASHES: dict[tuple[str, int, int], str] = {}


def _file_hash(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:  # a model listed twice (or judged again in-process) is hashed once
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def model_fingerprint(path: str, key: str = "models") -> str:
    """Hash of what decides a model's answers: config (or adapter config), weight files, tokenizer, and for a
    LoRA adapter its base model's fingerprint."""
    from transformers import AutoTokenizer

    from pipeline.tokenization import tokenizer_fingerprint

    folder = Path(path)
    weights = [
        p
        for p in folder.iterdir()
        if p.is_file()
        and (p.suffix == ".safetensors" or (p.suffix == ".bin" and p.name != "training_args.bin"))
    ]
    if not weights:
        raise PipelineError(f"{key}: '{path}' holds no weight files (*.safetensors or *.bin)")
    configs = [folder / n for n in ("config.json", "adapter_config.json") if (folder / n).is_file()]
    digest = hashlib.sha256()
    for p in sorted(configs + weights):
        digest.update(f"{p.name}:{_file_hash(p)}\n".encode())
    if (folder / "adapter_config.json").is_file():
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        check_model_dir(base, f"{key} (base model of the LoRA adapter '{path}')")
        digest.update(f"base:{model_fingerprint(base, key)}\n".encode())
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise PipelineError(
            f"{key}: cannot load the tokenizer of '{path}': {str(err).splitlines()[0]}"
        ) from None
    digest.update(f"tokenizer:{tokenizer_fingerprint(tokenizer)}\n".encode())
    return digest.hexdigest()[:16]


def sampling_settings(cfg: EvalConfig) -> dict[str, Any]:
    """The settings that decide the answers (greedy ignores top_p/top_k, so they do not split the cache)."""
    sampled = cfg.temperature > 0
    return {
        "temperature": float(cfg.temperature),
        "top_p": float(cfg.top_p) if sampled else 1.0,
        "top_k": int(cfg.top_k) if sampled else 0,
        "max_new_tokens": int(cfg.max_new_tokens),
        "num_samples": int(cfg.num_samples),
        "seed": int(cfg.seed) if sampled else 0,
    }


def generate_answers(
    tokenizer,
    model,
    texts: list[str],
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    progress=None,
) -> list[list[str]]:
    """`num_samples` answers to each rendered prompt, batched with left padding, decoded without special
    tokens. Each batch is seeded from `seed` and its texts, so the same batch gives the same answers."""
    import torch
    from transformers import GenerationConfig

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    sampled = temperature > 0
    eos = model.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    # every knob set explicitly: a model's own generation_config.json must not change what was asked for
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampled,
        temperature=temperature if sampled else 1.0,
        top_p=top_p if sampled else 1.0,
        top_k=top_k if sampled else 50,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids or None,
    )
    device = next(model.parameters()).device
    answers: list[list[str]] = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        torch.manual_seed(stable_seed(seed, batch))
        with torch.no_grad():
            out = model.generate(**enc, generation_config=config)
        decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        answers += [decoded[i * num_samples : (i + 1) * num_samples] for i in range(len(batch))]
        if progress is not None:
            progress.update(len(batch))
    return answers


def _torch_dtype(name: str):
    import torch

    if name == "auto":
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return getattr(torch, name)


def _read_cache(path: Path, num_samples: int) -> dict[str, list[str]]:
    import pyarrow.parquet as pq

    if not path.is_file():
        return {}
    try:
        table = pq.read_table(path, columns=["prompt_key", "sample_index", "answer"]).to_pylist()
    except Exception as err:
        logger.warning("eval: ignoring unreadable answers cache %s (%s)", path, str(err).splitlines()[0])
        return {}
    by_key: dict[str, dict[int, str]] = defaultdict(dict)
    for row in table:
        by_key[row["prompt_key"]][row["sample_index"]] = row["answer"]
    return {
        k: [v[i] for i in range(num_samples)]
        for k, v in by_key.items()
        if all(i in v for i in range(num_samples))
    }


def _write_cache(
    path: Path, answers: dict[str, list[str]], ids: dict[str, str], spec: ModelSpec, settings: dict
) -> None:
    import pyarrow as pa

    rows = [
        {"prompt_key": k, "prompt_id": ids.get(k, ""), "sample_index": i, "answer": a}
        for k, samples in answers.items()
        for i, a in enumerate(samples)
    ]
    schema = pa.schema(
        [
            ("prompt_key", pa.string()),
            ("prompt_id", pa.string()),
            ("sample_index", pa.int32()),
            ("answer", pa.string()),
        ],
        metadata={
            "model_fingerprint": spec.fingerprint,
            "model_path": spec.path,
            "sampling": json.dumps(settings, sort_keys=True),
        },
    )
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=schema), path)


def answers_for(
    spec: ModelSpec, items: list[PromptItem], cfg: EvalConfig, cache_dir: Path
) -> dict[str, list[str]]:
    """prompt key -> answers of one model: from the cache where there, generated (and cached) otherwise."""
    from tqdm.auto import tqdm

    settings = sampling_settings(cfg)
    settings_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"answers-{spec.fingerprint}-{settings_key}.parquet"
    cached = _read_cache(path, cfg.num_samples)
    todo = [it for it in items if it.key not in cached]
    logger.info(
        "eval: %s: %d of %d prompts' answers in the cache %s",
        spec.name,
        len(items) - len(todo),
        len(items),
        path.name,
    )
    if todo:
        import torch

        tokenizer, model = _load_generator(spec, cfg)
        ids = {it.key: it.prompt_id for it in items}
        with tqdm(total=len(todo), desc=f"generating {spec.name}", unit="prompt") as bar:
            step = max(CACHE_FLUSH_PROMPTS, cfg.batch_size)
            for start in range(0, len(todo), step):
                chunk = todo[start : start + step]
                texts = [render_chat(tokenizer, it.messages) for it in chunk]
                kwargs = {
                    k: settings[k] for k in ("num_samples", "temperature", "top_p", "top_k", "max_new_tokens")
                }
                new = generate_answers(
                    tokenizer, model, texts, batch_size=cfg.batch_size, seed=cfg.seed, progress=bar, **kwargs
                )
                for it, samples in zip(chunk, new, strict=True):
                    cached[it.key] = list(samples)
                _write_cache(path, cached, ids, spec, settings)  # a crash loses at most one chunk
        spec.generated = len(todo)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {it.key: cached[it.key] for it in items}


def _load_generator(spec: ModelSpec, cfg: EvalConfig):
    import torch

    from pipeline.models import load_for_generation

    tokenizer, model = load_for_generation(spec.path, key="models", dtype=_torch_dtype(cfg.dtype))
    if torch.cuda.is_available():
        model = model.to("cuda")
    return tokenizer, model


# ------------------------------------------------------------------------------------------ scoring


def score_code(
    items: list[PromptItem], answers: dict[str, dict[str, list[str]]], cfg: EvalConfig
) -> dict[str, dict[str, list[bool | None]]]:
    """model -> prompt key -> per answer: passed every test (None: the prompt has no tests). One sandbox
    pool for every model's answers."""
    from pipeline.rewards import code_execution_reward, humaneval_reward

    jobs = [
        (m, it, s, a) for m, by_key in answers.items() for it in items for s, a in enumerate(by_key[it.key])
    ]
    passed: dict[str, dict[str, list[bool | None]]] = {
        m: {it.key: [None] * cfg.num_samples for it in items} for m in answers
    }
    options = {"timeout": cfg.code_timeout, "workers": cfg.code_workers}
    plain = [j for j in jobs if j[1].humaneval is None]
    if plain:
        rewards = code_execution_reward([j[3] for j in plain], [j[1].tests for j in plain], **options)
        for (m, it, s, _), r in zip(plain, rewards, strict=True):
            passed[m][it.key][s] = None if r is None else r >= 1.0  # 2 * fraction - 1 == 1: every test passed
    humaneval = [j for j in jobs if j[1].humaneval is not None]
    if humaneval:
        rewards = humaneval_reward(
            [j[1].messages for j in humaneval],
            [[{"role": "assistant", "content": j[3]}] for j in humaneval],
            [j[1].humaneval["test"] for j in humaneval],
            [j[1].humaneval["entry_point"] for j in humaneval],
            [j[1].humaneval.get("code_prompt") for j in humaneval],
            **options,
        )
        for (m, it, s, _), r in zip(humaneval, rewards, strict=True):
            passed[m][it.key][s] = None if r is None else r >= 1.0
    return passed


def build_judge(cfg: EvalConfig, rm_judge: RewardModelJudge | None) -> PairwiseJudge:
    if cfg.judge == "reward_model":
        assert rm_judge is not None
        return rm_judge
    judge = OpenAIJudge(
        base_url=cfg.judge_base_url or "",
        model=cfg.judge_model or "",
        api_key_env=cfg.judge_api_key_env,
        timeout=cfg.judge_timeout,
        max_retries=cfg.judge_max_retries,
        backoff=cfg.judge_backoff,
        concurrency=cfg.judge_concurrency,
        max_tokens=cfg.judge_max_tokens,
        template=cfg.judge_template or DEFAULT_JUDGE_TEMPLATE,
        allow_http_key=cfg.judge_allow_http_key,
    )
    if cfg.judge_api_key_env and not os.environ.get(cfg.judge_api_key_env):
        logger.info(
            "eval: no %s in the environment; the judge is called without an API key", cfg.judge_api_key_env
        )
    return judge


def pairwise(
    judge: PairwiseJudge,
    items: list[PromptItem],
    answers: dict[str, dict[str, list[str]]],
    baseline: str,
    skip_identical: bool,
) -> dict[str, dict[str, list[PairResult]]]:
    """model -> prompt key -> both-orders results of answer i against the baseline's answer i."""
    slots = []  # (model, prompt, sample) to ask the judge about
    results: dict[str, dict[str, list[PairResult | None]]] = {}
    for model, by_key in answers.items():
        if model == baseline:
            continue
        results[model] = {}
        for it in items:
            row: list[PairResult | None] = []
            for s, (a, b) in enumerate(zip(by_key[it.key], answers[baseline][it.key], strict=True)):
                if skip_identical and a == b:
                    row.append(PairResult(0.5, 0.5))
                else:
                    row.append(None)
                    slots.append((model, it, s, a, b))
            results[model][it.key] = row
    if slots:
        judged = judge_both_orders(
            judge, [s[1].messages for s in slots], [s[3] for s in slots], [s[4] for s in slots]
        )
        for (model, it, s, _, _), res in zip(slots, judged, strict=True):
            results[model][it.key][s] = res
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ outputs


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of any row, in first-seen order (rows of the baseline lack the win-rate, for example)."""
    return list(dict.fromkeys(c for row in rows for c in row))


def write_csv_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = _columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def log_to_tracker(cfg: EvalConfig, metrics: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Aggregates (as `eval/<model>/<metric>`) and the per-prompt table to W&B. A tracker failure is a warning:
    the results are already in eval.json."""
    if cfg.report_to != "wandb":
        return
    try:
        import wandb

        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "pipeline"),
            name=cfg.run_name or Path(cfg.output_dir).name,
            job_type="eval",
            config=config_dict(cfg),
            dir=os.environ.get("WANDB_DIR", cfg.output_dir),
        )
        try:
            flat = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            run.log(flat)
            run.summary.update(flat)
            columns = _columns(rows)
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            run.log({"eval/per_prompt": table})
        finally:
            run.finish()
    except Exception as err:
        logger.warning(
            "eval: W&B logging failed (%s); the results are in eval.json", str(err).splitlines()[0]
        )


# ------------------------------------------------------------------------------------------ stage


# the dataclasses a recipe of this stage fills (tests/test_configs.py parses every shipped recipe with them)
CONFIG_CLASSES = (EvalConfig,)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (cfg,) = parse_stage_args(CONFIG_CLASSES, argv, "eval")

    # every input is checked before anything is written
    check_config(cfg)
    specs = model_specs(cfg)
    items = load_prompts(cfg)
    if needs_reward_model(cfg):
        from pipeline.models import check_reward_model_dir

        check_reward_model_dir(cfg.reward_model_path)
    judge: PairwiseJudge | None = None
    if "pairwise_judge" in cfg.scorers and cfg.judge == "openai":
        judge = build_judge(cfg, None)
        judge.check_reachable()  # type: ignore[attr-defined]
    for spec in specs:
        spec.fingerprint = model_fingerprint(spec.path)
    baseline = cfg.baseline or specs[0].name

    output_dir = outputs.claim(cfg.output_dir, "eval")
    log_path = setup_logging(output_dir)
    setup_tracking(cfg.report_to, output_dir)
    run = RunInfo(output_dir, "eval", (cfg,), cfg.seed)
    logger.info("eval: output_dir=%s log=%s", output_dir, log_path)
    logger.info(
        "eval: %d prompts, models %s, scorers %s, sampling %s",
        len(items),
        ", ".join(s.name for s in specs),
        ", ".join(cfg.scorers),
        sampling_settings(cfg),
    )
    cache_dir = Path(cfg.answers_cache or output_dir / "answers")
    if isinstance(judge, OpenAIJudge):  # a rerun after a failure pays only for the verdicts still missing
        judge.use_cache(cache_dir / "judge_verdicts.jsonl")
    metrics: dict[str, Any] = {"num_prompts": len(items)}
    try:
        answers = {spec.name: answers_for(spec, items, cfg, cache_dir) for spec in specs}
        metrics.update({f"{s.name}/generated_prompts": s.generated for s in specs})
        per_prompt, samples, aggregates, judge_stats = score_all(cfg, items, answers, baseline, judge)
        for model, by_metric in aggregates.items():
            for name, agg in by_metric.items():
                metrics[f"{model}/{name}"] = agg["mean"]
                metrics[f"{model}/{name}_ci_low"] = agg["ci_low"]
                metrics[f"{model}/{name}_ci_high"] = agg["ci_high"]
        metrics.update(judge_stats)
        write_outputs(cfg, output_dir, specs, items, per_prompt, samples, aggregates, judge_stats, baseline)
    except BaseException:
        run.finish(metrics, status="failed")
        raise
    run.finish(metrics)
    for model, by_metric in aggregates.items():
        for name, agg in by_metric.items():
            ci = "" if agg["ci_low"] is None else f" [{agg['ci_low']:.3f}, {agg['ci_high']:.3f}]"
            shown = "n/a" if agg["mean"] is None else f"{agg['mean']:.3f}"
            logger.info("eval: %s %s = %s%s (n=%d)", model, name, shown, ci, agg["n"])
    log_to_tracker(cfg, metrics, per_prompt)
    return metrics


def score_all(cfg, items, answers, baseline, judge):
    """(per-prompt rows, per-answer rows, model -> metric -> bootstrap summary, judge statistics)."""
    code = score_code(items, answers, cfg) if "code" in cfg.scorers else None
    rm_judge = None
    if needs_reward_model(cfg):
        import torch

        from pipeline.models import load_reward_model

        tokenizer, model = load_reward_model(cfg.reward_model_path, dtype=_torch_dtype(cfg.dtype))
        if torch.cuda.is_available():
            model = model.to("cuda")
        rm_judge = RewardModelJudge(tokenizer, model, cfg.batch_size, cfg.reward_max_length)
    rewards: dict[str, dict[str, list[float]]] = {}
    if "reward_model" in cfg.scorers:
        flat = [(m, it, a) for m in answers for it in items for a in answers[m][it.key]]
        scores = rm_judge.score([f[1].messages for f in flat], [f[2] for f in flat], progress="reward model")
        for (m, it, _), value in zip(flat, scores, strict=True):
            rewards.setdefault(m, {}).setdefault(it.key, []).append(value)
    pairs = None
    judge_stats: dict[str, Any] = {}
    if "pairwise_judge" in cfg.scorers:
        judge = judge or build_judge(cfg, rm_judge)
        pairs = pairwise(judge, items, answers, baseline, cfg.judge_skip_identical)
        all_pairs = [r for by_key in pairs.values() for row in by_key.values() for r in row]
        judge_stats = {
            "judge": cfg.judge,
            "judge_pairs": len(all_pairs),
            "judge_invalid": sum(not r.valid for r in all_pairs),
            "judge_first_position_rate": _mean([r.first_position for r in all_pairs]),
        }
        if isinstance(judge, OpenAIJudge):
            judge_stats["judge_requests"] = judge.requests
            judge_stats["judge_cached"] = judge.cached

    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    series: dict[str, dict[str, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for model in answers:
        for it in items:
            for s, answer in enumerate(answers[model][it.key]):
                sample: dict[str, Any] = {"model": model, "prompt_id": it.prompt_id, "sample_index": s}
                if code is not None:
                    sample["passed"] = code[model][it.key][s]
                if model in rewards:
                    sample["reward"] = rewards[model][it.key][s]
                if pairs is not None and model != baseline:
                    sample["win"] = pairs[model][it.key][s].score
                samples.append({**sample, "answer": answer})
            row: dict[str, Any] = {"model": model, "prompt_id": it.prompt_id, "num_samples": cfg.num_samples}
            if code is not None:
                flags = code[model][it.key]
                row["num_passed"] = None if any(f is None for f in flags) else sum(bool(f) for f in flags)
                row.update(pass_at_k_of(flags, cfg.pass_k))
            if model in rewards:
                row["reward"] = _mean(rewards[model][it.key])
            if pairs is not None and model != baseline:
                results = pairs[model][it.key]
                row["win_rate"] = _mean([r.score for r in results])
                row["judge_invalid"] = sum(not r.valid for r in results)
            for name in [f"pass@{k}" for k in cfg.pass_k] + ["reward", "win_rate"]:
                if name in row:
                    series[model][name].append(row[name])
            rows.append(row)
    aggregates = {
        model: {
            name: bootstrap(values, cfg.bootstrap_samples, cfg.seed, model, name)
            for name, values in by.items()
        }
        for model, by in series.items()
    }
    if pairs is not None:
        for model, by_key in pairs.items():
            results = [r for row in by_key.values() for r in row]
            aggregates[model]["win_rate"].update(
                baseline=baseline,
                pairs=len(results),
                invalid=sum(not r.valid for r in results),
                ties=sum(r.score == 0.5 for r in results),
                first_position_rate=_mean([r.first_position for r in results]),
            )
    return rows, samples, aggregates, judge_stats


def write_outputs(cfg, output_dir, specs, items, rows, samples, aggregates, judge_stats, baseline) -> None:
    import pyarrow as pa

    columns = _columns(samples)
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in samples])
    write_parquet_atomic(table, output_dir / "eval_samples.parquet")
    write_csv_atomic(output_dir / "eval.csv", rows)
    report = {
        "models": {
            s.name: {"path": s.path, "fingerprint": s.fingerprint, "generated_prompts": s.generated}
            for s in specs
        },
        "baseline": baseline if "pairwise_judge" in cfg.scorers else None,
        "scorers": cfg.scorers,
        "sampling": sampling_settings(cfg),
        "num_prompts": len(items),
        "bootstrap": {"samples": cfg.bootstrap_samples, "level": 0.95, "seed": cfg.seed, "over": "prompts"},
        "aggregates": aggregates,
        "judge": judge_stats or None,
        "per_prompt": rows,
    }
    atomic_write_text(output_dir / "eval.json", json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
