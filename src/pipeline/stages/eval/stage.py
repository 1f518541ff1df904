"""`pipeline eval`: check → prompts → answers (generated or cached) → scores → outputs. The stage's
documentation is the package's (`pipeline.stages.eval`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline import outputs
from pipeline.configs import parse_stage_args
from pipeline.judges import (
    OpenAIJudge,
    PairwiseJudge,
)
from pipeline.runinfo import RunInfo, setup_logging, setup_tracking
from pipeline.stages.eval.config import EvalConfig, check_config, model_specs, needs_reward_model
from pipeline.stages.eval.generation import answers_for, model_fingerprint, sampling_settings
from pipeline.stages.eval.prompts import load_prompts
from pipeline.stages.eval.scorers import build_judge, score_all
from pipeline.stages.eval.write import log_to_tracker, write_outputs
from pipeline.stats import INTERVAL_NAMES

logger = logging.getLogger("pipeline.eval")


# ------------------------------------------------------------------------------------------ config checks


# ------------------------------------------------------------------------------------------ prompts


# ------------------------------------------------------------------------------------------ generation


# ------------------------------------------------------------------------------------------ scoring


# ------------------------------------------------------------------------------------------ outputs


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
        metrics.update({f"{s.name}/answers_cut_at_max_new_tokens": s.cut for s in specs})
        per_prompt, samples, aggregates, judge_stats = score_all(cfg, items, answers, baseline, judge)
        for model, by_metric in aggregates.items():
            for name, agg in by_metric.items():
                metrics[f"{model}/{name}"] = agg["mean"]
                metrics[f"{model}/{name}_ci_low"] = agg["ci_low"]
                metrics[f"{model}/{name}_ci_high"] = agg["ci_high"]
                metrics[f"{model}/{name}_interval"] = agg["interval"]
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
            how = INTERVAL_NAMES[agg["interval"]]
            logger.info("eval: %s %s = %s%s (n=%d prompts, %s)", model, name, shown, ci, agg["n"], how)
    log_to_tracker(cfg, metrics, per_prompt)
    return metrics


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
