"""What `pipeline eval` is told (EvalConfig), its checks, and the models and prompts it works on."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.models import check_model_dir

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
        default=1000,
        metadata={
            "help": "Bootstrap resamples of the prompts for the 95%% intervals of metrics that are not 0/1 per "
            "prompt (win rate, reward, pass@k over several samples; 0: none). 0/1 metrics get "
            "Wilson's interval."
        },
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
    cut: int = 0  # answers generated in this run that reached max_new_tokens without ending


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
