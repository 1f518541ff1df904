"""`pipeline <stage> ...`: the single entry point. Dispatches by stage name to the module named in `STAGES`.

Stage modules are imported lazily so `pipeline --help` answers without importing torch.
"""

from __future__ import annotations

import importlib
import os
import sys

from pipeline import __version__
from pipeline.errors import PipelineError
from pipeline.redaction import redact_argv

# stage name -> (module holding `main(argv)`, one-line description). Only implemented stages are listed.
STAGES: dict[str, tuple[str, str]] = {
    "tiny-model": (
        "pipeline.stages.tiny_model",
        "Build the offline tiny tokenizer + random causal LM (no hub needed) into --output_dir.",
    ),
    "synthetic-data": (
        "pipeline.stages.synthetic_data",
        "Export the shipped synthetic code task as SFT, preference-pair and reward-keyed code-RL parquet.",
    ),
    "sft": ("pipeline.stages.sft", "Supervised fine-tuning (TRL SFTTrainer) from a YAML recipe."),
    "generate": (
        "pipeline.stages.generate",
        "Greedy answers of a saved model (or LoRA adapter) to chat prompts.",
    ),
    "prepare": (
        "pipeline.stages.prepare",
        "Validate, clean, transform, filter and split reward-keyed code-RL parquet into training views.",
    ),
    "logp": (
        "pipeline.stages.logp",
        "Per-token reference log-probs of every prepared response, stored by uid (resumable, multi-process).",
    ),
    "collect": (
        "pipeline.stages.collect",
        "Sample answers from a policy, judge them in the sandbox, write code-RL parquet (with behaviour logps).",
    ),
    "ips": (
        "pipeline.stages.ips",
        "Offline importance-sampling training (IPS/TOPR/RWR + KL) from prepared rows and stored logps.",
    ),
    "rm": (
        "pipeline.stages.rm",
        "Pairwise reward model (TRL RewardTrainer) on prompt/chosen/rejected; saves a sequence classifier.",
    ),
    "dpo": (
        "pipeline.stages.dpo",
        "DPO and every TRL preference loss; reference live, precomputed, or read from `pipeline logp` output.",
    ),
    "grpo": (
        "pipeline.stages.grpo",
        "Online GRPO (TRL GRPOTrainer) with sandboxed code-execution rewards and/or a reward model.",
    ),
    "rloo": (
        "pipeline.stages.rloo",
        "Online RLOO (TRL RLOOTrainer) with the same prompts and rewards as grpo.",
    ),
    "ppo": (
        "pipeline.stages.ppo",
        "PPO (our own): policy, frozen reference, critic, reward model and/or sandboxed code rewards; GAE, KL.",
    ),
    "eval": (
        "pipeline.stages.eval",
        "Generate answers from one or more models (cached) and score them: sandboxed pass@k, reward model, "
        "pairwise judge.",
    ),
    "run": (
        "pipeline.stages.run",
        "Chain stages from a pipeline YAML (skip what is complete, rerun what changed), sweep seeds x sizes.",
    ),
    "subset": (
        "pipeline.stages.subset",
        "A training subset of N rows for size sweeps: prompt-matched (prefixes) or size-matched (same prompts).",
    ),
    "report": (
        "pipeline.stages.report",
        "Collect run.json metrics under run folders into runs.csv, PNG figures (mean ± 95% CI), a booktabs table "
        "and summary.md.",
    ),
    "check": (
        "pipeline.stages.check",
        "Memory per GPU of a recipe (weights, grads, optimizer, activations; ZeRO/FSDP, LoRA/QLoRA), probe, micro-batch.",
    ),
    "demo": (
        "pipeline.stages.demo",
        "The offline demo: tiny model + synthetic task through SFT, IPS, DPO, RM, PPO, eval and report (CPU).",
    ),
    "eval-code": (
        "pipeline.stages.eval_code",
        "Run HumanEval-format code samples in the sandbox; write <samples>_results.jsonl and print pass@k.",
    ),
}


def usage() -> str:
    width = max(len(name) for name in STAGES)
    lines = [
        f"pipeline {__version__}: LLM post-training stages driven by YAML recipes.",
        "",
        "usage: pipeline <stage> [--config recipe.yaml] [--field value ...]",
        "       pipeline <stage> --help      # every field of that stage, with its default",
        "",
        "stages:",
    ]
    lines += [f"  {name:<{width}}  {help_line}" for name, (_, help_line) in STAGES.items()]
    lines += [
        "",
        "A recipe is one flat YAML file whose keys are the stage's config fields (TRL's config dataclasses plus",
        "ours); values in the YAML are defaults and command-line flags override them.",
    ]
    return "\n".join(lines)


def close_process_group() -> None:
    """Leave the process group cleanly (gloo aborts the interpreter at exit otherwise)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def report_error(line: str) -> None:
    """A stage's one-line error: on stderr; under `python -m pipeline.launch`, to its error file instead,
    tagged with the rank, so that the launcher prints it once, last (see `pipeline.launch`)."""
    path = os.environ.get("PIPELINE_ERROR_FILE")
    if not path:
        print(line, file=sys.stderr)
        return
    rank = os.environ.get("RANK", "0")
    with open(path, "a", encoding="utf-8") as f:  # one short append per rank: lines do not interleave
        f.write(f"{rank}\t{line}\n")


def run_stage(stage: str, argv: list[str]):
    """Import the stage's module and call its `main(argv)`; returns whatever the stage returns."""
    from pipeline.runinfo import close_logging

    module_name, _ = STAGES[stage]
    try:
        return importlib.import_module(module_name).main(argv)
    finally:
        close_logging()  # the next stage of an in-process `pipeline run` must not write into this one's run.log


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    stage, rest = argv[0], argv[1:]
    # every later reader of the process's command line (run.json, W&B's metadata, logs) sees no secret
    sys.argv[1:] = redact_argv(sys.argv[1:])
    if stage not in STAGES:
        import difflib

        close = difflib.get_close_matches(stage, STAGES, n=1)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        print(
            f"pipeline: error: unknown stage '{stage}'{hint} (run `pipeline --help` for the list)",
            file=sys.stderr,
        )
        return 2
    try:
        run_stage(stage, rest)
    except PipelineError as err:
        report_error(f"pipeline {stage}: error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        print(f"pipeline {stage}: interrupted", file=sys.stderr)
        return 130
    finally:
        close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
