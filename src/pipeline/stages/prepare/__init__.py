"""Prepare stage: validate, clean, transform, filter and split reward-keyed code-RL data.

    pipeline prepare --data_path logs/*.parquet --output_dir data/prepared \\
        --reward_key normalized_reward --response_key unprocessed_response --datafilter posonly

Input rows (parquet, read one row group at a time; or jsonl): `uid`, `prompt_pretokenized` (JSON list of chat
messages: a user turn and an optional assistant prefix; plain text = one user message), the reward column
`reward_key` and the response column `response_key`. Everything is checked before anything is written; the
first problem is one line naming file, column and row/uid (exit 2), and no output folder appears.

Order of operations: dedupe → clean (one enclosing Markdown fence removed) → reward transforms (clip, then
normalize; result in column `reward_output_key`, the raw column is kept) → filters (datafilter, then token
length) → split (by a hash of the prompt, so no prompt is in both splits) → views.

Output (`output_dir`, written under a temporary name and renamed when complete):
- `rl/{train,eval}-NNNNN.parquet`: every input column (response cleaned) + `reward` + `prompt_id` (uint64 hash
  of the canonical prompt: rows with equal prompts share it). An input column named like the output reward
  (`reward_output_key`, e.g. `--reward_key reward`) is kept as `raw_reward`; the manifest's
  `columns.raw_reward` names the raw reward's column either way;
- `sft/{train,eval}-NNNNN.parquet`: `messages` (user, assistant = prefix + response) for rows whose reward
  exceeds `pos_threshold`;
- `pairs/{train,eval}-NNNNN.parquet`: `prompt`/`chosen`/`rejected` (+ rewards, uids) from responses to the
  same prompt whose rewards differ by at least `pair_margin`, chosen from ids and rewards in memory; a pair
  whose two answers are the same text after cleaning is left out (counted: `drops.identical_pairs`). A pair
  whose two rows are read in one batch (a prompt's responses stored together, as logged RL data usually
  is) is written while its rows are cleaned; the others, and all pairs after a `max_length` filter, are
  read back from the rl shards (`*late-*` shards; the rl view is written aside if not among the views);
- `manifest.json`: sources with sha256, rows in/out, drops per reason, the config, tokenizer fingerprint.

Code: config, read, scan (pass 1), transform, clean, views (pass 2), shards, pairs (pass 3), parallel; `main` in
stage.py.
"""

from pipeline.errors import PipelineError
from pipeline.stages.prepare.clean import clean_responses
from pipeline.stages.prepare.config import PrepareConfig
from pipeline.stages.prepare.stage import CONFIG_CLASSES, main

__all__ = ["CONFIG_CLASSES", "PipelineError", "PrepareConfig", "clean_responses", "main"]
