"""Quick look at a trained model: greedy answers to a few chat prompts.

    pipeline generate --model runs/demo/sft --prompt "Write a function add_3(x) that returns x plus 3."
    pipeline generate --model runs/demo/sft --prompts_from runs/demo/data/sft_eval.parquet --num_prompts 3

`--model` is a folder saved by a stage (a full model, or a LoRA adapter whose `adapter_config.json` names
its base model). Prompts from a file are the first user message of each row's `messages` or `prompt`.
"""

from __future__ import annotations

import argparse

from pipeline.errors import PipelineError
from pipeline.models import load_for_generation


def generate(tokenizer, model, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
    """Greedy completions of single-turn user prompts, decoded without special tokens."""
    import torch

    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def greedy_pass_rate(tokenizer, model, problems, max_new_tokens: int = 48, timeout: float = 5.0) -> float:
    """Share of problems whose greedy answer (one code fence stripped) passes all their tests in the sandbox.

    `problems`: objects with `prompt` and `tests` (e.g. `pipeline.tasks.synthetic.Problem`).
    """
    from pipeline.sandbox import run_many, strip_code_fence

    answers = generate(tokenizer, model, [p.prompt for p in problems], max_new_tokens)
    results = run_many(
        [(strip_code_fence(a), p.tests) for a, p in zip(answers, problems, strict=True)], timeout
    )
    return sum(r.status == "passed" for r in results) / max(len(problems), 1)


def prompts_from_file(spec: str, limit: int) -> list[str]:
    from pipeline.data import load_files

    rows = load_files(spec, "--prompts_from")
    column = "messages" if "messages" in rows.column_names else "prompt"
    if column not in rows.column_names:
        raise PipelineError(f"--prompts_from: '{spec}' has no 'messages' or 'prompt' column")
    prompts = []
    for value in rows.select(range(min(limit, len(rows))))[column]:
        prompts.append(
            value if isinstance(value, str) else next(m["content"] for m in value if m["role"] == "user")
        )
    return prompts


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="pipeline generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder written by a stage (model or LoRA adapter)")
    parser.add_argument("--prompt", action="append", default=[], help="a user prompt (repeatable)")
    parser.add_argument("--prompts_from", help="parquet/jsonl with a `messages` or `prompt` column")
    parser.add_argument(
        "--num_prompts", type=int, default=3, help="how many prompts to take from --prompts_from"
    )
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument(
        "--synthetic_pass_rate",
        type=int,
        metavar="NUM_PROBLEMS",
        help="also measure greedy pass@1 (sandbox-executed) on the held-out problems of the synthetic task "
        "exported with --num_problems NUM_PROBLEMS (seed 0, eval_fraction 0.1)",
    )
    args = parser.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_from:
        prompts += prompts_from_file(args.prompts_from, args.num_prompts)
    if not prompts and args.synthetic_pass_rate is None:
        raise PipelineError("give --prompt TEXT, --prompts_from FILE or --synthetic_pass_rate NUM_PROBLEMS")
    tokenizer, model = load_for_generation(args.model)
    if args.synthetic_pass_rate is not None:
        from pipeline.tasks.synthetic import generate_problems, split_problems

        _, held_out = split_problems(generate_problems(args.synthetic_pass_rate, 0), 0.1, 0)
        rate = greedy_pass_rate(tokenizer, model, held_out, args.max_new_tokens)
        print(f"{args.model}: greedy pass@1 on {len(held_out)} held-out synthetic problems = {rate:.3f}")
    answers = generate(tokenizer, model, prompts, args.max_new_tokens)
    for prompt, answer in zip(prompts, answers, strict=True):
        print(f"### prompt\n{prompt}\n### answer\n{answer}\n")
    return answers
