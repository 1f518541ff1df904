"""Synthetic Python coding task small enough for a tiny randomly initialised LM to learn on a CPU.

Problems come from a dozen templates ("Write a function add_3(x) that returns x plus 3.") with a
constant or a letter as parameter; every solution is the same two-line shape::

    def add_3(x):
        return x + 3

Each problem has 2-3 plausible wrong solutions and 3-5 ``assert`` tests. Expected values are computed by
running the (trusted, template-made) reference in-process; the exported RL rewards, by contrast, come
from executing each response in :mod:`pipeline.sandbox`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data import write_parquet_atomic
from pipeline.errors import PipelineError
from pipeline.rewards import reward_from_fraction
from pipeline.sandbox import run_many, strip_code_fence

__all__ = [
    "Problem",
    "TEMPLATE_NAMES",
    "generate_problems",
    "corpus_text",
    "sft_rows",
    "preference_rows",
    "other_constant_solutions",
    "coderl_rows",
    "export_task",
    "main",
]

MIN_TESTS, MAX_TESTS = 3, 5
_LETTERS = string.ascii_lowercase


@dataclass
class Problem:
    """One templated coding problem."""

    task_id: str
    prompt: str
    entry_point: str
    solution: str
    wrong_solutions: list[str]
    tests: list[str]
    template: str = field(default="")
    param: Any = None  # the template's constant or letter (37 in add_37)


# --------------------------------------------------------------------------------------------- templates


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = _LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _next_letter(c: str) -> str:
    return _LETTERS[(_LETTERS.index(c) + 1) % 26]


@dataclass(frozen=True)
class _Template:
    """Text fields use ``{p}`` (the parameter) and derived ``{p1}`` = p+1, ``{m1}`` = p-1, ``{q}`` = next letter."""

    name: str
    func: str
    arg: str
    prompt: str
    body: str
    wrong: tuple[str, ...]
    params: tuple[Any, ...]
    sample: Callable[[random.Random, Any], Any]

    def fill(self, text: str, p: Any) -> str:
        if isinstance(p, int):
            return text.format(p=p, p1=p + 1, m1=p - 1)
        return text.format(p=p, q=_next_letter(p))


_TEMPLATES: tuple[_Template, ...] = (
    _Template(
        "add", "add_{p}", "x", "returns x plus {p}.", "x + {p}", ("x - {p}", "x + {p1}", "x"),
        tuple(range(1, 100)), lambda r, p: r.randint(-20, 50),
    ),
    _Template(
        "sub", "sub_{p}", "x", "returns x minus {p}.", "x - {p}", ("x + {p}", "x - {p1}", "x"),
        tuple(range(1, 100)), lambda r, p: r.randint(-20, 50),
    ),
    _Template(
        "mul", "times_{p}", "x", "returns x times {p}.", "x * {p}", ("x + {p}", "x * {p1}", "x"),
        tuple(range(2, 31)), lambda r, p: r.randint(-9, 20),
    ),
    _Template(
        "max", "max_{p}", "x", "returns the larger of x and {p}.", "max(x, {p})",
        ("min(x, {p})", "max(x, {p1})", "x"),
        tuple(range(0, 41)), lambda r, p: r.randint(p - 10, p + 10),
    ),
    _Template(
        "min", "min_{p}", "x", "returns the smaller of x and {p}.", "min(x, {p})",
        ("max(x, {p})", "min(x, {m1})", "x"),
        tuple(range(0, 41)), lambda r, p: r.randint(p - 10, p + 10),
    ),
    _Template(
        "dist", "dist_{p}", "x", "returns the absolute difference between x and {p}.", "abs(x - {p})",
        ("x - {p}", "abs(x + {p})", "abs(x - {p1})"),
        tuple(range(1, 51)), lambda r, p: r.randint(-10, 60),
    ),
    _Template(
        "is_div", "is_div_{p}", "x", "returns True if x is divisible by {p}, else False.", "x % {p} == 0",
        ("x % {p} == 1", "x % {p1} == 0", "x % {p} != 0"),
        tuple(range(2, 21)), lambda r, p: p * r.randint(0, 9) if r.random() < 0.5 else r.randint(0, 99),
    ),
    _Template(
        "repeat", "repeat_{p}", "s", "returns the string s repeated {p} times.", "s * {p}",
        ("s * {p1}", "s * {m1}", "s"),
        tuple(range(2, 10)), lambda r, p: _word(r, 1, 3),
    ),
    _Template(
        "first", "first_{p}", "s", "returns the first {p} characters of s.", "s[:{p}]",
        ("s[:{p1}]", "s[{p}:]", "s"),
        tuple(range(1, 7)), lambda r, p: _word(r, 1, p + 4),
    ),
    _Template(
        "count", "count_{p}", "s", "returns how many times the letter {p} appears in s.", 's.count("{p}")',
        ('s.count("{q}")', "len(s)", 's.count("{p}") + 1'),
        tuple(_LETTERS), lambda r, p: _word(r, 0, 8, p + _next_letter(p) + "z"),
    ),
    _Template(
        "sum", "sum_plus_{p}", "xs", "returns the sum of the list xs plus {p}.", "sum(xs) + {p}",
        ("sum(xs) - {p}", "sum(xs) + {p1}", "sum(xs)"),
        tuple(range(1, 51)), lambda r, p: [r.randint(0, 9) for _ in range(r.randint(1, 5))],
    ),
    _Template(
        "reverse", "rev_{p}", "s", "returns s reversed followed by the letter {p}.", 's[::-1] + "{p}"',
        ('s + "{p}"', "s[::-1]", '"{p}" + s[::-1]'),
        tuple(_LETTERS), lambda r, p: _word(r, 2, 6),
    ),
    _Template(
        "upper", "upper_{p}", "s", "returns s in upper case followed by the letter {p}.", 's.upper() + "{p}"',
        ('s.lower() + "{p}"', "s.upper()", 's + "{p}"'),
        tuple(_LETTERS), lambda r, p: _word(r, 1, 6),
    ),
)  # fmt: skip

TEMPLATE_NAMES: tuple[str, ...] = tuple(t.name for t in _TEMPLATES)
_TEMPLATES_BY_NAME = {t.name: t for t in _TEMPLATES}
MAX_PROBLEMS = sum(len(t.params) for t in _TEMPLATES)


def _literal(value: Any) -> str:
    # Double-quoted strings, like the solutions, so the tiny model sees one quoting style.
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _compile_fn(code: str, name: str) -> Callable[..., Any]:
    # Trusted code: it is built from the templates above, never from model output.
    ns: dict[str, Any] = {}
    exec(compile(code, f"<{name}>", "exec"), ns)
    return ns[name]


def _code(tpl: _Template, p: Any, expr: str) -> str:
    """The two-line function of template `tpl` with parameter `p` (its name) returning `expr`."""
    return f"def {tpl.fill(tpl.func, p)}({tpl.arg}):\n    return {expr}"


def _make_problem(task_id: str, tpl: _Template, p: Any, rng: random.Random) -> Problem:
    name = tpl.fill(tpl.func, p)
    signature = f"{name}({tpl.arg})"
    prompt = f"Write a function {signature} that {tpl.fill(tpl.prompt, p)}"
    solution = _code(tpl, p, tpl.fill(tpl.body, p))
    wrong = list(dict.fromkeys(_code(tpl, p, tpl.fill(w, p)) for w in tpl.wrong))
    ref_fn = _compile_fn(solution, name)
    wrong_fns = [_compile_fn(w, name) for w in wrong]

    def outputs(fn: Callable[..., Any], x: Any) -> Any:
        try:
            return fn(x)
        except Exception as e:  # a wrong solution may raise; that still differs from the reference
            return e

    def add_inputs(inputs: list[Any], target: int) -> None:
        for _ in range(50):
            if len(inputs) >= target:
                return
            x = tpl.sample(rng, p)
            if x not in inputs:
                inputs.append(x)

    n_tests = rng.randint(MIN_TESTS, MIN_TESTS + 1)
    inputs: list[Any] = []
    add_inputs(inputs, MIN_TESTS)
    # Make sure every wrong solution fails some test: add a distinguishing input where needed, and drop
    # wrong solutions that are (on sampled inputs) indistinguishable from the reference.
    kept_wrong = []
    for w, fn in zip(wrong, wrong_fns, strict=True):
        if any(outputs(fn, x) != ref_fn(x) for x in inputs):
            kept_wrong.append(w)
            continue
        if len(inputs) >= MAX_TESTS:
            continue
        for _ in range(100):
            x = tpl.sample(rng, p)
            if outputs(fn, x) != ref_fn(x):
                inputs.append(x)
                kept_wrong.append(w)
                break
    add_inputs(inputs, n_tests)  # distinguishing inputs above count towards n_tests
    if len(kept_wrong) < 2:
        raise RuntimeError(f"template {tpl.name!r} with parameter {p!r} yields fewer than 2 wrong solutions")
    tests = [f"assert {name}({_literal(x)}) == {_literal(ref_fn(x))}" for x in inputs]
    return Problem(task_id, prompt, name, solution, kept_wrong, tests, template=tpl.name, param=p)


def generate_problems(num_problems: int, seed: int = 0) -> list[Problem]:
    """Deterministic list of ``num_problems`` problems with distinct prompts.

    Templates are visited in shuffled rounds so that any 13 consecutive problems cover every template
    (while its parameters last). A smaller request is a prefix of a larger one with the same seed.
    """
    if not 0 <= num_problems <= MAX_PROBLEMS:
        raise ValueError(f"num_problems must be in [0, {MAX_PROBLEMS}], got {num_problems}")
    rng = random.Random(seed)
    remaining = {t.name: rng.sample(t.params, len(t.params)) for t in _TEMPLATES}
    problems: list[Problem] = []
    order: list[_Template] = []
    while len(problems) < num_problems:
        if not order:
            order = rng.sample(_TEMPLATES, len(_TEMPLATES))
        tpl = order.pop(0)
        if not remaining[tpl.name]:
            continue  # this template's parameters are used up; the others fill in
        p = remaining[tpl.name].pop()
        problems.append(_make_problem(f"synth/{len(problems):05d}", tpl, p, rng))
    return problems


# ------------------------------------------------------------------------------------------------- views

_EXTRA_TEXT = (
    "Write a function that returns the answer.",
    "The function takes one argument and returns a value.",
    "def return assert True False None if else for in while and or not import from class lambda",
    "plus minus times divided by the sum of the list the string the letter characters",
    "larger smaller absolute difference between upper case lower case reversed repeated divisible",
    "print(len(s))\nprint(sum(xs))\nprint(max(a, b))\nprint(min(a, b))\nprint(abs(x - y))",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 99 100",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "Here is the code:\n```python\ndef f(x):\n    return x\n```",
    "user assistant system",
)


def _fence(code: str) -> str:
    return f"```python\n{code}\n```"


def corpus_text(num_problems: int = 400, seed: int = 0) -> list[str]:
    """Deterministic texts (prompts, code, tests, a few plain words) to train a tokenizer on."""
    texts = list(_EXTRA_TEXT)
    for prob in generate_problems(num_problems, seed):
        texts.append(prob.prompt)
        texts.append(prob.solution)
        texts.append(_fence(prob.solution))
        texts.extend(prob.wrong_solutions)
        texts.append("\n".join(prob.tests))
    return texts


def _user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _assistant(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


def sft_rows(problems: Sequence[Problem]) -> list[dict[str, Any]]:
    """Chat SFT rows: user prompt, assistant reference solution (unfenced)."""
    return [{"messages": _user(p.prompt) + _assistant(p.solution), "task_id": p.task_id} for p in problems]


def other_constant_solutions(problem: Problem, count: int, rng: random.Random) -> list[str]:
    """`count` wrong solutions that are the reference with another of its template's constants in the body
    (`return x + 52` under `def add_37(x):`); the function name keeps the problem's constant."""
    tpl, p = _TEMPLATES_BY_NAME[problem.template], problem.param
    candidates = [_code(tpl, p, tpl.fill(tpl.body, q)) for q in tpl.params if q != p]
    candidates = [c for c in candidates if c not in problem.wrong_solutions]  # new wrong solutions only
    return rng.sample(candidates, min(count, len(candidates)))


def preference_rows(
    problems: Sequence[Problem], constant_negatives: int = 0, seed: int = 0
) -> list[dict[str, Any]]:
    """TRL conversational preference rows: one per wrong solution (reference chosen, wrong rejected), plus
    `constant_negatives` per problem whose rejected side has another constant (`other_constant_solutions`).

    Those extra pairs are hard negatives for reward models: a third of the task's own wrong solutions differ
    from the reference only in a constant off by one, and ranking them means checking the body's constant
    against the prompt's. Seeded per problem, so a problem's pairs do not depend on the others."""
    rows = []
    for p in problems:
        wrong = list(p.wrong_solutions)
        if constant_negatives:
            rng = random.Random(f"constants:{seed}:{p.task_id}")
            wrong += other_constant_solutions(p, constant_negatives, rng)
        for w in wrong:
            rows.append(
                {
                    "prompt": _user(p.prompt),
                    "chosen": _assistant(p.solution),
                    "rejected": _assistant(w),
                    "task_id": p.task_id,
                }
            )
    return rows


def coderl_rows(
    problems: Sequence[Problem],
    responses_per_problem: int = 4,
    seed: int = 0,
    response_key: str = "unprocessed_response",
    reward_key: str = "normalized_reward",
    timeout: float = 5.0,
) -> list[dict[str, Any]]:
    """Offline code-RL rows: fenced responses (a seeded mix of reference and wrong solutions) with
    rewards ``2 * pass_fraction - 1`` measured by executing them in the sandbox."""
    if responses_per_problem < 1:
        raise ValueError("responses_per_problem must be >= 1")
    pending: list[tuple[Problem, int, str]] = []
    for prob in problems:
        # Per-problem RNG: a problem's responses do not depend on which other problems are in the list.
        rng = random.Random(f"coderl:{seed}:{prob.task_id}")
        for j in range(responses_per_problem):
            code = prob.solution if rng.random() < 0.5 else rng.choice(prob.wrong_solutions)
            pending.append((prob, j, _fence(code)))
    jobs = [(strip_code_fence(resp), prob.tests) for prob, _, resp in pending]
    results = run_many(jobs, timeout=timeout, progress="executing responses" if len(jobs) >= 200 else None)
    rows = []
    for (prob, j, resp), res in zip(pending, results, strict=True):
        frac = res.fraction
        rows.append(
            {
                "uid": f"{prob.task_id}/r{j}",
                "prompt_pretokenized": json.dumps(_user(prob.prompt)),
                response_key: resp,
                reward_key: reward_from_fraction(frac),
                "task_id": prob.task_id,
                "pass_fraction": frac,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------ export


def split_problems(
    problems: Sequence[Problem], eval_fraction: float, seed: int = 0
) -> tuple[list[Problem], list[Problem]]:
    """Deterministic train/eval split by problem; both sides keep generation order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(problems)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(1, n_eval), n - 1)
    order = list(range(n))
    random.Random(f"split:{seed}").shuffle(order)
    eval_idx = set(order[:n_eval])
    train = [p for i, p in enumerate(problems) if i not in eval_idx]
    held = [p for i, p in enumerate(problems) if i in eval_idx]
    return train, held


def export_task(
    output_dir: str | os.PathLike[str],
    num_problems: int = 200,
    seed: int = 0,
    eval_fraction: float = 0.1,
    responses_per_problem: int = 4,
    constant_negatives: int = 0,
) -> dict[str, str]:
    """Write SFT, preference and code-RL parquet files (train/eval split by problem).

    `constant_negatives` adds that many "other constant" pairs per problem to `pairs_train` (see
    `preference_rows`); `pairs_eval` always holds the task's own pairs. Returns ``{"sft_train": path, ...}``
    for the six files.
    """
    if constant_negatives < 0:
        raise ValueError(f"constant_negatives must be >= 0, got {constant_negatives}")
    import pyarrow as pa

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = generate_problems(num_problems, seed)
    train, held = split_problems(problems, eval_fraction, seed)

    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    sft_schema = pa.schema([("messages", messages), ("task_id", pa.string())])
    pairs_schema = pa.schema(
        [("prompt", messages), ("chosen", messages), ("rejected", messages), ("task_id", pa.string())]
    )
    coderl_schema = pa.schema(
        [
            ("uid", pa.string()),
            ("prompt_pretokenized", pa.string()),
            ("unprocessed_response", pa.string()),
            ("normalized_reward", pa.float64()),
            ("task_id", pa.string()),
            ("pass_fraction", pa.float64()),
        ]
    )
    # One sandbox pool over all problems keeps the workers busy; rows are then split by task_id.
    rl_all = coderl_rows(problems, responses_per_problem=responses_per_problem, seed=seed)

    written: dict[str, str] = {}
    for split, probs in (("train", train), ("eval", held)):
        ids = {p.task_id for p in probs}
        rl_rows = [r for r in rl_all if r["task_id"] in ids]
        for stem, rows, schema in (
            (f"sft_{split}", sft_rows(probs), sft_schema),
            (
                f"pairs_{split}",
                preference_rows(probs, constant_negatives if split == "train" else 0, seed),
                pairs_schema,
            ),
            (f"coderl_{split}", rl_rows, coderl_schema),
        ):
            path = out / f"{stem}.parquet"
            write_parquet_atomic(pa.Table.from_pylist(rows, schema=schema), path)
            written[stem] = str(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``pipeline synthetic-data --output_dir DIR``."""
    parser = argparse.ArgumentParser(
        prog="pipeline synthetic-data",
        description=(
            "Generate the synthetic Python coding task (templated one-line functions with assert tests) "
            "and write train/eval parquet files: sft_* (chat messages), pairs_* (TRL preference pairs: "
            "reference chosen, wrong solution rejected) and coderl_* (fenced responses with rewards "
            "2*pass_fraction-1 measured by running them in the sandbox). Problems are split by task_id."
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
    from pipeline import outputs

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
