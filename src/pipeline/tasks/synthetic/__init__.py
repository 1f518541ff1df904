"""Synthetic Python coding task small enough for a tiny randomly initialised LM to learn on a CPU.

Problems come from a dozen templates ("Write a function add_3(x) that returns x plus 3.") with a
constant or a letter as parameter; every solution is the same two-line shape::

    def add_3(x):
        return x + 3

Each problem has 2-3 plausible wrong solutions and 3-5 ``assert`` tests. Expected values are computed by
running the (trusted, template-made) reference in-process, and so are the exported RL rewards: every
response there is the task's own reference or wrong solution. Model output only ever runs in
:mod:`pipeline.sandbox`.
"""

from pipeline.tasks.synthetic.export import export_task, split_problems
from pipeline.tasks.synthetic.problems import MAX_PROBLEMS, TEMPLATE_NAMES, Problem, generate_problems
from pipeline.tasks.synthetic.rows import (
    coderl_rows,
    corpus_text,
    other_constant_solutions,
    preference_rows,
    sft_rows,
)

__all__ = ["MAX_PROBLEMS", "TEMPLATE_NAMES", "Problem", "coderl_rows", "corpus_text", "export_task", "generate_problems",
           "other_constant_solutions", "preference_rows", "sft_rows", "split_problems"]  # fmt: skip
