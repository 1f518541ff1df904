"""What `pipeline prepare` is told (PrepareConfig) and the names its output uses."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger("pipeline.prepare")


SCHEMA_VERSION = 1


PAIRS_PER_BUCKET = 10_000  # pairs assembled at once in pass 3 (~40 MB of text at 2 KB responses)


PROMPT_KEY = "prompt_pretokenized"


@dataclass
class PrepareConfig:
    data_path: str = field(
        metadata={"help": "Input parquet/jsonl: a file, folder, glob or comma-separated list."}
    )
    output_dir: str = field(metadata={"help": "Folder to create (it must not exist unless overwrite=true)."})
    reward_key: str = field(default="normalized_reward", metadata={"help": "Column holding the reward."})
    response_key: str = field(
        default="unprocessed_response", metadata={"help": "Column holding the response."}
    )
    reward_output_key: str = field(
        default="reward", metadata={"help": "Column the trainers read the reward from."}
    )
    dedupe: Literal["error", "keep_first"] = field(
        default="error",
        metadata={"help": "Duplicate uids: an error listing the first few, or keep the first."},
    )
    reward_clip: str | None = field(
        default=None, metadata={"help": "Clip rewards to 'lo,hi', e.g. '-1.5,1.5'."}
    )
    reward_normalize: Literal["none", "zscore", "minmax", "rank"] = field(
        default="none",
        metadata={"help": "Normalize rewards after clipping: none|zscore|minmax (to [0,1])|rank."},
    )
    normalize_per_prompt: bool = field(
        default=False, metadata={"help": "Normalize within each prompt's group."}
    )
    datafilter: Literal["none", "posonly", "negonly", "topk_per_prompt"] = field(
        default="none",
        metadata={
            "help": "none: every row; posonly: reward > pos_threshold; negonly: reward <= neg_threshold; "
            "topk_per_prompt: the `topk` best rows of each prompt. Applied to the transformed reward."
        },
    )
    pos_threshold: float = field(default=0.75, metadata={"help": "posonly / SFT view: keep reward > this."})
    neg_threshold: float = field(default=0.0, metadata={"help": "negonly: keep reward <= this."})
    topk: int = field(default=1, metadata={"help": "Rows kept per prompt by topk_per_prompt."})
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Target tokenizer (local folder) for the length filter and fingerprint."},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Drop rows whose prompt + response exceed this many tokens (needs tokenizer)."},
    )
    eval_fraction: float = field(default=0.05, metadata={"help": "Share of prompts held out for evaluation."})
    pair_margin: float = field(
        default=0.5, metadata={"help": "Preference pairs need rewards at least this far apart."}
    )
    max_pairs_per_prompt: int = field(default=4, metadata={"help": "Cap on preference pairs per prompt."})
    views: str = field(
        default="rl,sft,pairs", metadata={"help": "Comma-separated views to write: rl, sft, pairs."}
    )
    row_group_size: int = field(
        default=10_000, metadata={"help": "Rows per parquet row group in the outputs."}
    )
    shard_rows: int = field(default=500_000, metadata={"help": "Rows per output shard file."})
    max_text_bytes: int = field(
        default=1_000_000,
        metadata={
            "help": "Rows whose prompt or response is longer than this many bytes (UTF-8) are dropped and "
            "counted (drops.text_too_large) before anything parses, cleans or tokenizes them."
        },
    )
    batch_rows: int = field(default=5_000, metadata={"help": "Rows read per batch (bounds memory)."})
    seed: int = field(default=0, metadata={"help": "Salt of the prompt hash that decides the split."})
    num_proc: int = field(
        default=0,
        metadata={"help": "Worker processes for cleaning/writing (0: up to 2 for inputs of 200k rows or more, "
                  "else 1). Output rows are the same; shard files are named per worker."},
    )  # fmt: skip
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace output_dir if it exists and is an earlier prepare output "
            "(any other folder is refused)."
        },
    )
    reuse: bool = field(
        default=False,
        metadata={"help": "Keep output_dir as it is when it is a complete prepare output of the same files "
                          "(paths, sizes, sha256) and the same settings; else prepare it again (implies overwrite)."},
    )  # fmt: skip

    # fields that do not change the output (a rerun with another value may reuse it)
    NOT_OUTPUT = ("output_dir", "overwrite", "reuse", "num_proc", "batch_rows")


def raw_column_name(cfg: PrepareConfig) -> str:
    """Where an input column named like the output reward column (`reward_output_key`) is kept: `raw_<name>`.
    So `--reward_key reward` works: the transformed reward is `reward`, the raw one `raw_reward`."""
    return f"raw_{cfg.reward_output_key}"


def raw_reward_column(cfg: PrepareConfig) -> str:
    """The column of the views that holds the input's reward as it came in."""
    return raw_column_name(cfg) if cfg.reward_key == cfg.reward_output_key else cfg.reward_key
