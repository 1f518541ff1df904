"""`pipeline collect`: sample answers from a policy, judge each in the sandbox, write the users' code-RL parquet.

    pipeline collect --model_name_or_path runs/demo/sft --problems problems.jsonl --num_samples 8 \\
        --output_path data/round1.parquet [--temperature 1.0 --top_p 1.0 --max_new_tokens 256 --seed 0]
    accelerate launch -m pipeline.cli collect --config recipes/demo/collect.yaml   # shards over processes

`--problems`: JSON lines (plain or gzipped) or parquet in any format the sandbox judges — HumanEval, MBPP,
stdin/stdout, the synthetic task (`pipeline synthetic-data` writes `problems_train.jsonl`); see
`pipeline.tasks.code_problems` for the prompt each format gets and how an answer becomes a program.
Each problem gets `num_samples` answers (temperature > 0: this stage samples), every answer is executed in
the sandbox, and one row per answer goes to the output, in exactly the schema `pipeline prepare` reads:

- `uid` (`<task_id>/<policy fingerprint>/s<seed>/<k>`: unique across policies, seeds and samples),
  `prompt_pretokenized` (the chat prompt as JSON), `unprocessed_response` (the answer as generated, special
  tokens left out; `response_key` renames it), `normalized_reward` (`reward_key`) = 2 × passed / total − 1
  in [-1, 1];
- `task_id`, `sample_index`, `tests_passed`, `tests_total`, `verdict` (passed / failed / timeout / crashed);
- `behaviour_logps` (float32 per generated token: the log-prob it was drawn with under the sampling
  settings, so the behaviour policy μ is known exactly; `pipeline.generation`), `behaviour_token_ids`,
  `finish_reason` (eos / length);
- `policy_fingerprint` (config and weights), `sampling` (JSON: backend, temperature, top_p, top_k,
  max_new_tokens, num_samples, seed).

Generation is batched with `transformers` (or vLLM with `use_vllm: true`, where it is installed). Work is
cut into parts of `problems_per_part` problems; rank r of W (`accelerate launch`) takes parts r, r+W, ...;
each part is written under a temporary name and renamed, so a killed run resumes at the first missing part
and no uid is written twice. The output folder holds `job.json` (what was asked: a folder holding another
job is refused), `parts/`, `run.json`, and the merged `samples.parquet` (or `--output_path`), written last.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import data, outputs
from pipeline.configs import parse_stage_args
from pipeline.data import sha256_file, write_parquet_atomic
from pipeline.errors import PipelineError
from pipeline.models import check_model_dir
from pipeline.runinfo import RunInfo, setup_logging
from pipeline.tasks.code_problems import CodeProblem, load_code_problems

logger = logging.getLogger("pipeline.collect")
OWNER_KEY = b"pipeline.collect"  # parquet metadata of a file this stage wrote (and may replace)


@dataclass
class CollectConfig:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The policy: a local model folder or LoRA adapter."}
    )
    problems: str | None = field(
        default=None, metadata={"help": "Problem file (.jsonl, .jsonl.gz, .parquet) in any sandbox format."}
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Work folder (parts, job.json, run.json). Default: <output_path>.collect"},
    )
    output_path: str | None = field(
        default=None, metadata={"help": "The merged parquet. Default: <output_dir>/samples.parquet"}
    )
    num_samples: int = field(default=4, metadata={"help": "Answers per problem."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer, in tokens."})
    batch_size: int = field(
        default=16, metadata={"help": "Prompts per generate call (each gets num_samples)."}
    )
    seed: int = field(default=0, metadata={"help": "Seeds the sampling (per batch, from the prompts)."})
    max_problems: int | None = field(default=None, metadata={"help": "Use the first N problems of the file."})
    problems_per_part: int = field(
        default=64, metadata={"help": "Problems per part file (the unit of resuming)."}
    )
    reward_key: str = field(default="normalized_reward", metadata={"help": "Name of the reward column."})
    response_key: str = field(default="unprocessed_response", metadata={"help": "Name of the answer column."})
    timeout: float = field(default=5.0, metadata={"help": "Sandbox wall-clock seconds per answer."})
    sandbox_workers: int | None = field(
        default=None, metadata={"help": "Parallel sandboxes (default: CPU count)."}
    )
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on a GPU that has it, else fp32), float32, bfloat16."}
    )
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (must be installed)."})
    # fmt: skip


CONFIG_CLASSES = (CollectConfig,)


def check_config(cfg: CollectConfig) -> None:
    if not cfg.problems:
        raise PipelineError("problems is required: a problem file (.jsonl, .jsonl.gz or .parquet)")
    if not cfg.output_dir and not cfg.output_path:
        raise PipelineError("set output_path (the parquet to write) or output_dir")
    if cfg.temperature <= 0:
        raise PipelineError("temperature must be > 0: collect samples (greedy answers are a point mass, not a "
                            "behaviour policy; use `pipeline eval` for greedy pass@1)")  # fmt: skip
    if not 0 < cfg.top_p <= 1:
        raise PipelineError(f"top_p must be in (0, 1], got {cfg.top_p}")
    for name in ("num_samples", "max_new_tokens", "batch_size", "problems_per_part"):
        if getattr(cfg, name) < 1:
            raise PipelineError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.top_k < 0 or (cfg.max_problems is not None and cfg.max_problems < 1):
        raise PipelineError("top_k must be >= 0 and max_problems >= 1")
    if cfg.reward_key == cfg.response_key:
        raise PipelineError("reward_key and response_key must differ")
    if cfg.use_vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise PipelineError(
                "use_vllm: vLLM is not installed here (pip install vllm), or set use_vllm false"
            )


def sampling_settings(cfg: CollectConfig) -> dict:
    return {"backend": "vllm" if cfg.use_vllm else "transformers", "temperature": cfg.temperature,
            "top_p": cfg.top_p, "top_k": cfg.top_k, "max_new_tokens": cfg.max_new_tokens,
            "num_samples": cfg.num_samples, "seed": cfg.seed}  # fmt: skip


def job_of(cfg: CollectConfig, fingerprint: str, problems: list[CodeProblem]) -> dict:
    """What decides every row: another job's parts are never mixed in."""
    return {
        "policy_fingerprint": fingerprint,
        "problems_sha256": sha256_file(cfg.problems),
        "problems": len(problems),
        "sampling": sampling_settings(cfg),
        "problems_per_part": cfg.problems_per_part,
        "reward_key": cfg.reward_key,
        "response_key": cfg.response_key,
        "timeout": cfg.timeout,
    }


def part_path(folder: Path, index: int) -> Path:
    return folder / "parts" / f"part-{index:05d}.parquet"


def part_rows(cfg, problems: list[CodeProblem], samples, results, fingerprint: str) -> pa.Table:
    """One row per answer, in the users' code-RL schema plus what `collect` knows about each sample."""
    from pipeline.rewards import reward_from_fraction

    settings = json.dumps(sampling_settings(cfg), sort_keys=True)
    rows, i = [], 0
    for problem, answers in zip(problems, samples, strict=True):
        for k, sample in enumerate(answers):
            res = results[i]
            i += 1
            rows.append({
                "uid": f"{problem.problem_id}/{fingerprint}/s{cfg.seed}/{k}",
                "prompt_pretokenized": json.dumps(problem.messages),
                cfg.response_key: sample.text,
                cfg.reward_key: reward_from_fraction(res.fraction),
                "task_id": problem.problem_id,
                "sample_index": k,
                "tests_passed": res.passed,
                "tests_total": res.total,
                "verdict": res.status,
                "behaviour_logps": sample.logps,
                "behaviour_token_ids": sample.token_ids,
                "finish_reason": sample.finish_reason,
                "policy_fingerprint": fingerprint,
                "sampling": settings,
            })  # fmt: skip
    return pa.Table.from_pylist(rows, schema=row_schema(cfg))


def row_schema(cfg) -> pa.Schema:
    return pa.schema([
        ("uid", pa.string()), ("prompt_pretokenized", pa.string()), (cfg.response_key, pa.string()),
        (cfg.reward_key, pa.float64()), ("task_id", pa.string()), ("sample_index", pa.int32()),
        ("tests_passed", pa.int32()), ("tests_total", pa.int32()), ("verdict", pa.string()),
        ("behaviour_logps", pa.list_(pa.float32())), ("behaviour_token_ids", pa.list_(pa.int32())),
        ("finish_reason", pa.string()), ("policy_fingerprint", pa.string()), ("sampling", pa.string()),
    ])  # fmt: skip


def collect_part(cfg, generator, problems: list[CodeProblem], fingerprint: str) -> pa.Table:
    """Sample every problem of one part, judge every answer in the sandbox, and build its rows."""
    from pipeline.sandbox import run_many

    samples = generator(problems)
    jobs = [
        (p.program(s.text), p.check) for p, answers in zip(problems, samples, strict=True) for s in answers
    ]
    results = run_many(jobs, timeout=cfg.timeout, workers=cfg.sandbox_workers)
    return part_rows(cfg, problems, samples, results, fingerprint)


def transformers_generator(cfg: CollectConfig, device):
    """problems -> per problem, `num_samples` `pipeline.generation.Sample`s, with transformers."""
    from pipeline.generation import sample_with_logps, torch_dtype
    from pipeline.models import load_for_generation
    from pipeline.tokenization import render_prompt

    dtype = torch_dtype(cfg.dtype if cfg.dtype != "auto" or device.type == "cuda" else "float32")
    tokenizer, model = load_for_generation(cfg.model_name_or_path, key="model_name_or_path", dtype=dtype)
    model = model.to(device)

    def generate(problems: list[CodeProblem]):
        texts = [render_prompt(tokenizer, p.messages) for p in problems]
        return sample_with_logps(tokenizer, model, texts, num_samples=cfg.num_samples, temperature=cfg.temperature,
                                 top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.batch_size, seed=cfg.seed)  # fmt: skip

    return generate


def vllm_generator(cfg: CollectConfig):
    """The same with vLLM: per-token log-probs of the sampled tokens under the processed (sampling)
    distribution (`logprobs_mode="processed_logprobs"`), so they are μ's, as with transformers."""
    try:
        import vllm
    except ImportError:
        raise PipelineError(
            "use_vllm: vLLM is not installed here (pip install vllm), or set use_vllm false"
        ) from None
    from pipeline.generation import Sample
    from pipeline.stats import stable_seed

    llm = vllm.LLM(model=cfg.model_name_or_path, seed=cfg.seed, logprobs_mode="processed_logprobs",
                   dtype="auto" if cfg.dtype == "auto" else cfg.dtype)  # fmt: skip
    tokenizer = llm.get_tokenizer()

    def generate(problems: list[CodeProblem]):
        from pipeline.tokenization import render_prompt

        texts = [render_prompt(tokenizer, p.messages) for p in problems]
        params = vllm.SamplingParams(n=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                                     top_k=cfg.top_k or -1, max_tokens=cfg.max_new_tokens, logprobs=0,
                                     seed=stable_seed(cfg.seed, texts))  # fmt: skip
        out = []
        for request in llm.generate(texts, params, use_tqdm=False):
            answers = []
            for o in request.outputs:
                ids = list(o.token_ids)
                logps = [float(step[t].logprob) for step, t in zip(o.logprobs, ids, strict=True)]
                reason = "eos" if o.finish_reason == "stop" else "length"
                answers.append(Sample(ids, o.text, logps, reason))
            out.append(answers)
        return out

    return generate


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = parse_stage_args(CONFIG_CLASSES, argv, "collect")
    check_config(cfg)
    check_model_dir(cfg.model_name_or_path, "model_name_or_path")
    problems = load_code_problems(cfg.problems, "problems")[: cfg.max_problems]
    output_path = Path(cfg.output_path or Path(cfg.output_dir) / "samples.parquet")
    refuse_foreign_file(output_path)
    folder = outputs.claim(cfg.output_dir or f"{output_path}.collect", "collect")

    import torch
    from accelerate import PartialState

    from pipeline.logp_store import model_fingerprint

    state = PartialState(cpu=not torch.cuda.is_available())
    with state.main_process_first():  # one rank hashes the weights; the others read the hash cache
        fingerprint = model_fingerprint(cfg.model_name_or_path)
        job = job_of(cfg, fingerprint, problems)
    start_job(folder, job, state)
    if state.is_main_process:
        setup_logging(folder)
    run = RunInfo(folder, "collect", (cfg,), cfg.seed) if state.is_main_process else None
    try:
        written = collect_parts(cfg, problems, folder, state, fingerprint)
        state.wait_for_everyone()
        metrics = (
            merge_parts(cfg, folder, output_path, len(problems), fingerprint) if state.is_main_process else {}
        )
    except BaseException:
        if run is not None:
            run.finish({}, status="failed")
        raise
    if run is not None:
        metrics["parts_written_now"] = written
        run.finish(metrics)
        print(json.dumps({"output_path": str(output_path), **metrics}))
    return metrics


def refuse_foreign_file(path: Path) -> None:
    """The output parquet is replaced only when `collect` wrote it."""
    if not path.exists():
        return
    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception:
        metadata = {}
    if OWNER_KEY not in metadata:
        raise PipelineError(f"output_path '{path}' exists and was not written by `pipeline collect`; "
                            "choose another path (it is never overwritten)")  # fmt: skip


def start_job(folder: Path, job: dict, state) -> None:
    """Refuse a folder holding another job's parts; clear a killed run's unfinished part files."""
    stale = data.start_job(folder, job, state, folder / "parts", "part-*.parquet", "the samples",
                           "use another output_dir, or delete it")  # fmt: skip
    if stale:
        logger.info("collect: removed %d unfinished part files of an earlier run", len(stale))


def collect_parts(cfg, problems, folder: Path, state, fingerprint: str) -> int:
    """This rank's parts that are not on disk yet, each sampled, judged and written whole."""
    from tqdm.auto import tqdm

    per = cfg.problems_per_part
    count = -(-len(problems) // per)
    mine = range(state.process_index, count, state.num_processes)
    todo = [i for i in mine if not part_path(folder, i).is_file()]
    logger.info("collect rank %d/%d: %d parts to sample, %d done earlier", state.process_index,
                state.num_processes, len(todo), len(mine) - len(todo))  # fmt: skip
    if not todo:
        return 0
    generator = vllm_generator(cfg) if cfg.use_vllm else transformers_generator(cfg, state.device)
    total = sum(len(problems[i * per : (i + 1) * per]) for i in todo)
    with tqdm(total=total, desc=f"collect rank {state.process_index}", unit="problem") as bar:
        for index in todo:
            chunk = problems[index * per : (index + 1) * per]
            write_parquet_atomic(collect_part(cfg, generator, chunk, fingerprint), part_path(folder, index))
            bar.update(len(chunk))
    return len(todo)


def merge_parts(cfg, folder: Path, output_path: Path, num_problems: int, fingerprint: str) -> dict:
    """Every part, in order, into one parquet (written under a temporary name, then renamed); the counts."""
    count = -(-num_problems // cfg.problems_per_part)
    missing = [i for i in range(count) if not part_path(folder, i).is_file()]
    if missing:
        raise PipelineError(f"{folder}: parts {missing[:5]} are missing after every rank finished; rerun")
    table = pa.concat_tables([pq.read_table(part_path(folder, i)) for i in range(count)])
    if pc.count_distinct(table.column("uid")).as_py() != table.num_rows:
        raise PipelineError(f"{folder}: a uid appears twice across the parts; delete the folder and rerun")
    meta = {
        OWNER_KEY: json.dumps(
            {"policy_fingerprint": fingerprint, "sampling": sampling_settings(cfg)}
        ).encode()
    }
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    output_path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(table, output_path)
    rewards = table.column(cfg.reward_key).to_pylist()
    verdicts = table.column("verdict").to_pylist()
    metrics = {"problems": num_problems, "rows": table.num_rows, "mean_reward": sum(rewards) / len(rewards),
               "pass_rate": verdicts.count("passed") / len(verdicts),
               "problems_solved": len({t for t, v in zip(table.column("task_id").to_pylist(), verdicts, strict=True)
                                       if v == "passed"}),
               "truncated": table.column("finish_reason").to_pylist().count("length"),
               "output_sha256": sha256_file(output_path)}  # fmt: skip
    logger.info("collect: %d rows from %d problems -> %s (pass rate %.3f, %d problems solved at least once)",
                metrics["rows"], num_problems, output_path, metrics["pass_rate"], metrics["problems_solved"])  # fmt: skip
    return metrics


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
