"""`pipeline synthetic-data`: export the shipped synthetic code task as parquet (the task itself lives in
`pipeline.tasks.synthetic`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline import outputs
from pipeline.errors import PipelineError
from pipeline.tasks.synthetic import MAX_PROBLEMS, export_task


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``pipeline synthetic-data --output_dir DIR``."""
    parser = argparse.ArgumentParser(
        prog="pipeline synthetic-data",
        description=(
            "Generate the synthetic Python coding task (templated one-line functions with assert tests) "
            "and write train/eval parquet files: sft_* (chat messages), pairs_* (TRL preference pairs: "
            "reference chosen, wrong solution rejected) and coderl_* (fenced responses with rewards "
            "2*pass_fraction-1 from running the task's own solutions against its tests). Problems are split by task_id."
        ),
    )
    parser.add_argument("--output_dir", required=True, help="directory for the parquet files")
    parser.add_argument(
        "--num_problems",
        type=int,
        default=200,
        help=f"number of distinct problems, at most {MAX_PROBLEMS} (default: 200)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for problems, split and responses (default: 0)"
    )
    parser.add_argument(
        "--eval_fraction", type=float, default=0.1, help="share of problems held out for eval (default: 0.1)"
    )
    parser.add_argument(
        "--responses_per_problem",
        type=int,
        default=4,
        help="code-RL responses sampled per problem (default: 4)",
    )
    parser.add_argument(
        "--constant_negatives",
        type=int,
        default=0,
        help="extra train pairs per problem whose rejected solution is the reference with another constant "
        "(hard negatives that teach a reward model to check the code's constant against the prompt's); "
        "the eval pairs stay the task's own (default: 0)",
    )
    args = parser.parse_args(argv)
    outputs.claim(args.output_dir, "synthetic-data")
    try:
        written = export_task(
            args.output_dir,
            num_problems=args.num_problems,
            seed=args.seed,
            eval_fraction=args.eval_fraction,
            responses_per_problem=args.responses_per_problem,
            constant_negatives=args.constant_negatives,
        )
    except ValueError as err:  # out-of-range arguments: one line, exit 2
        raise PipelineError(str(err)) from None
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
