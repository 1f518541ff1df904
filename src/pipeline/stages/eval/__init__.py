"""Evaluation stage: generate answers from one or more models, score them, report pass@k and win-rates.

    pipeline eval --config recipes/demo/eval.yaml [--num_samples 5 --temperature 0.8 --output_dir runs/x ...]
    pipeline eval --models runs/demo/sft runs/demo/ips --synthetic_num_problems 520 --output_dir runs/ev

Prompts: `prompts` (a parquet/jsonl/json file, glob or folder) with a chat `prompt` (message list or text),
`messages` (the conversation up to its last non-assistant turn) or `prompt_pretokenized` (a JSON chat whose
optional final assistant message is a prefix the answer continues) column, the first found unless
`prompt_column` says which; or the synthetic task's held-out problems (`synthetic_num_problems`, the
`--num_problems` given to `pipeline synthetic-data`, with its seed and eval fraction). Repeated prompts are
evaluated once. A prompt's id is its `prompt_id`/`task_id`/`id` column (or `id_column`), else a hash.

Models (`models`, space-separated on the command line): local folders, full models or LoRA adapters, named
by `model_names` (default: the folder names). Each model answers every prompt `num_samples` times, in
batches of `batch_size` prompts, greedily (`temperature: 0`) or sampled (`temperature`, `top_p`, `top_k`),
at most `max_new_tokens` tokens, seeded per batch; the recipe's sampling settings replace the model's own
generation defaults. Answers are cached in `answers_cache` (default `<output_dir>/answers`), one parquet per
(model fingerprint: config, weights and tokenizer; sampling settings), keyed by prompt hash and sample
index: a rerun (new scorers, another judge) loads them instead of generating, and so does a second entry
of the same model.

Scorers (`scorers`):
- `code`: each answer (one code fence stripped) runs in the sandbox against its prompt's `tests` (a list of
  asserts; the synthetic task's problems carry them, `synthetic_task_seed` adds them to the task's files by
  task_id) or HumanEval's `test` + `entry_point` (+ optional `code_prompt`); it passes when every test
  does. pass@k for each k in `pass_k` is the unbiased estimator 1 - C(n-c, k)/C(n, k) per prompt.
- `reward_model`: the mean score of a prompt's answers under the reward model in `reward_model_path`.
- `pairwise_judge`: every model against `baseline` (default the first model), answer i against answer i,
  judged in both orders so position bias cancels (`pipeline.judges`). `judge: reward_model` (the model in
  `reward_model_path`) or `judge: openai`: any OpenAI-compatible endpoint (`judge_base_url`, `judge_model`;
  the key is read from the environment variable named by `judge_api_key_env`, never logged, and sent only
  to that origin over https or on this machine, never after a redirect). Requests time out after
  `judge_timeout` s and are retried `judge_max_retries` times with exponential back-off (and `Retry-After`);
  a dead endpoint is one line, before anything is generated. Every verdict is kept in
  `<answers_cache>/judge_verdicts.jsonl` as it arrives, so a rerun after a failure asks only what is
  missing (`judge_cached` counts the verdicts reused). A reply without a verdict is an invalid judgement,
  counted (`invalid`) and left out; a reply that is not a chat completion is an error. Each kind of pair is
  counted once (`pipeline.judges.pair_diagnostics`): `identical` answers (a tie by rule, never judged,
  with `judge_skip_identical`), `inconsistent` verdicts (the order decided: the answer shown first, or
  second, won both times), judged `ties`, `invalid`; `first_position_rate` is over the judged pairs only.

Writes to `output_dir`, each file under a temporary name then renamed: `eval.csv` (one row per model and
prompt: pass counts, pass@k, reward, win-rate against the baseline), `eval.json` (the same rows, aggregates
with 95% intervals over prompts — Wilson's score interval where every prompt's value is 0 or 1 (greedy
pass@1), else a percentile bootstrap seeded by `seed`; each aggregate names its `interval` — judge
statistics, model fingerprints),
`eval_samples.parquet` (every answer with its scores), `run.json` and `run.log`. `report_to: wandb` logs the
aggregates and the per-prompt table to W&B (offline unless WANDB_API_KEY is set). Bad input (no prompt
column, a model folder that does not exist, k > num_samples, ...) is one line before anything is written.

Code: config, prompts, generation (answers and their cache), scorers, write; `main` in stage.py.
"""

from pipeline.stages.eval import generation
from pipeline.stages.eval.config import EvalConfig, PromptItem
from pipeline.stages.eval.generation import generate_answers, model_fingerprint
from pipeline.stages.eval.scorers import score_code
from pipeline.stages.eval.stage import CONFIG_CLASSES, main
from pipeline.stats import pass_at_k_of

__all__ = ["CONFIG_CLASSES", "EvalConfig", "PromptItem", "generate_answers", "generation", "main", "model_fingerprint",
           "pass_at_k_of", "score_code"]  # fmt: skip
