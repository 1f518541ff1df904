"""`pipeline demo`: the whole pipeline on a CPU with no GPU and no hub, in a few minutes.

    pipeline demo [--output_dir runs/demo] [--fast] [--set sft_steps=100 ...]

Runs the embedded pipeline file (`pipeline/demo.yaml`, also `recipes/demo/pipeline.yaml`) through
`pipeline run`: it builds the tiny model and the synthetic code task, then SFT -> prepare -> logp -> IPS,
SFT -> DPO (reference log-probs from the logp stage), SFT -> RM -> PPO, and evaluates greedy pass@1 of the
base model and of every trained policy on held-out problems, executed in the sandbox. It writes
`<output_dir>/pass_at_1.md` and `.csv` (one row per stage) and `pipeline report`'s output in
`<output_dir>/report/` (`pass_at_1.png`, `table.tex`, `runs.csv`, `summary.md`), and prints where they are. Rerunning skips every stage whose output is complete and whose config is unchanged.
`--fast` cuts every budget (a smoke run of every stage, used by the tests); its numbers mean little.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.runinfo import atomic_write_text
from pipeline.stats import INTERVAL_NAMES

DEMO_FILE = Path(__file__).resolve().parent.parent / "demo.yaml"
FAST = {
    "sft_steps": 60,
    "ips_steps": 10,
    "dpo_steps": 8,
    "rm_steps": 10,
    "ppo_updates": 2,
    "eval_prompts": 16,
    "rounds": 1,
    "round_problems": 8,
    "round_samples": 2,
    "round_steps": 2,
    "round_filter": "none",
}
# the stages each policy took beyond the one it started from (its row's wall time); round_<k>: its block
TRAINED_BY = {"base": ("tiny",), "sft": ("sft",), "ips": ("prepare", "logp", "ips"), "dpo": ("dpo",),
              "ppo": ("rm", "ppo")}  # fmt: skip
ROUND_STAGES = ("collect", "prepare", "logp", "ips")


def policy_seconds(name: str, output_dir: Path) -> float | None:
    """The wall time of the stages that made policy `name` from its start, from the runner's record of each
    (None if one is unknown)."""
    from pipeline.stages.run.plan import read_marker

    stages = TRAINED_BY.get(name) or (
        tuple(f"{name}-{s}" for s in ROUND_STAGES) if name.startswith("round_") else ()
    )
    seconds = [(read_marker(output_dir, stage) or {}).get("seconds") for stage in stages]
    if not stages or not all(isinstance(value, (int, float)) for value in seconds):
        return None
    return round(sum(seconds), 1)


def pass_at_1_table(output_dir: Path) -> list[dict]:
    """One row per policy from the eval stage's run.json, in its order: pass@1, its 95% interval, which
    interval, and the wall time of the stages that trained it."""
    info_path = output_dir / "eval" / "run.json"
    if not info_path.is_file():
        raise PipelineError(f"{info_path}: missing; the eval stage did not complete")
    info = json.loads(info_path.read_text())
    metrics = info["metrics"]
    rows = []
    for name in info.get("config", {}).get("model_names") or []:
        if f"{name}/pass@1" in metrics:
            rows.append({"stage": name, "pass@1": metrics[f"{name}/pass@1"],
                         "ci_low": metrics.get(f"{name}/pass@1_ci_low"),
                         "ci_high": metrics.get(f"{name}/pass@1_ci_high"),
                         "interval": metrics.get(f"{name}/pass@1_interval"),
                         "n": metrics.get("num_prompts"), "seconds": policy_seconds(name, output_dir)})  # fmt: skip
    return rows


def write_table(rows: list[dict], output_dir: Path, num_prompts: int) -> tuple[Path, Path]:
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=["stage", "pass@1", "ci_low", "ci_high", "interval", "n", "seconds"]
    )
    writer.writeheader()
    writer.writerows(rows)
    csv_path, md_path = output_dir / "pass_at_1.csv", output_dir / "pass_at_1.md"
    atomic_write_text(csv_path, buffer.getvalue())
    methods = sorted({INTERVAL_NAMES[row["interval"]] for row in rows})
    lines = [f"Greedy pass@1 on {num_prompts} held-out synthetic problems (n = {num_prompts} per stage; "
             f"interval: {', '.join(methods) or 'none'})", "",
             "| stage | pass@1 | n | 95% interval | training wall time (s) |", "|---|---:|---:|---|---:|"]  # fmt: skip
    for row in rows:
        interval = "" if row["ci_low"] is None else f"{row['ci_low']:.3f}–{row['ci_high']:.3f}"
        wall = "" if row["seconds"] is None else f"{row['seconds']:.0f}"
        lines.append(f"| {row['stage']} | {row['pass@1']:.3f} | {row['n']} | {interval} | {wall} |")
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="pipeline demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))  # fmt: skip
    parser.add_argument("--output_dir", default="runs/demo", help="where everything goes (default runs/demo)")
    parser.add_argument(
        "--fast", action="store_true", help="tiny budgets: every stage runs, in about a minute"
    )
    parser.add_argument("--set", action="append", default=[], metavar="VAR=VALUE", help="override a budget")
    parser.add_argument("--dry_run", action="store_true", help="print the plan only")
    args = parser.parse_args(argv)
    from pipeline.stages import run

    sets = [f"{k}={v}" for k, v in FAST.items()] if args.fast else []
    sets += args.set
    started = time.time()
    run_argv = [str(DEMO_FILE), "--output_dir", args.output_dir, *[x for s in sets for x in ("--set", s)]]
    summary = run.main(run_argv + (["--dry_run"] if args.dry_run else []))
    if args.dry_run:
        return summary
    output_dir = Path(args.output_dir)
    rows = pass_at_1_table(output_dir)
    num_prompts = json.loads((output_dir / "eval" / "run.json").read_text())["metrics"].get("num_prompts", 0)
    csv_path, md_path = write_table(rows, output_dir, num_prompts)
    from pipeline.stages import report

    report_dir = output_dir / "report"
    report.main([str(output_dir), "--metrics", "pass@1", "--output_dir", str(report_dir)])
    seconds = time.time() - started
    print(md_path.read_text())
    print(f"demo finished in {seconds:.0f} s")
    print(f"  pass@1 table: {md_path} (and {csv_path.name})")
    print(f"  figure:       {report_dir / 'pass_at_1.png'}")
    print(f"  LaTeX table:  {report_dir / 'table.tex'}; every run's metrics: {report_dir / 'runs.csv'}")
    return {"rows": rows, "seconds": seconds, "summary": summary, "report_dir": str(report_dir)}
