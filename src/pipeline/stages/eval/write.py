"""Outputs: eval.csv, eval.json, eval_samples.parquet, and the tracker."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.data import write_parquet_atomic
from pipeline.runinfo import atomic_write_text, config_dict
from pipeline.stages.eval.config import EvalConfig
from pipeline.stages.eval.generation import sampling_settings

logger = logging.getLogger("pipeline.eval")


def mean_of(values: list[float | None]) -> float | None:
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
        "intervals": {
            "level": 0.95,
            "over": "prompts",
            "per_metric": "each aggregate's `interval`",
            "wilson": "when every prompt's value is 0 or 1",
            "bootstrap": {"samples": cfg.bootstrap_samples, "seed": cfg.seed, "when": "otherwise"},
        },
        "aggregates": aggregates,
        "judge": judge_stats or None,
        "per_prompt": rows,
    }
    atomic_write_text(output_dir / "eval.json", json.dumps(report, indent=2) + "\n")
