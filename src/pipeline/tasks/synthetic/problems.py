"""The problems: a dozen templates, each with constants or letters as parameter; a problem is its prompt,
reference solution, plausible wrong solutions and assert tests."""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
