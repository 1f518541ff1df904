"""IPS's options: `SFTConfig` plus the reward, filter, loss and logp-contract fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from trl import SFTConfig

from pipeline.configs import StageOptions

NO_SIGNAL = 1e-8  # rewards this close to 0 train nothing
# the first batch's mean |log πθ − log π_ref| per token above which a run that starts from its reference stops;
# measured on CPU (README, "logp contract"): 0 with fp32 logps, 0.0007-0.002 with bf16 ones, 0.5 with stale ones
LOGP_MISMATCH_THRESHOLD = 0.05


@dataclass
class IPSConfig(SFTConfig, StageOptions):
    """`SFTConfig` plus what IPS needs. Everything else (optimizer, DeepSpeed, logging) is TRL's."""

    data_path: str | None = field(default=None, metadata={"help": "A `pipeline prepare` output folder."})
    logp_dir: str | None = field(default=None, metadata={"help": "Default: {data_path}_{ref_tag}_logp."})
    ref_tag: str = field(
        default="ref", metadata={"help": "Tag of the logp run (names the default logp_dir)."}
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model the logps came from. Default: model_name_or_path."}
    )
    reward_key: str = field(default="reward", metadata={"help": "Reward column of the rl view to train on."})
    response_key: str | None = field(default=None, metadata={"help": "Default: the column the logps scored."})
    datafilter: Literal["none", "posonly", "negonly"] = field(
        default="none", metadata={"help": "none; posonly: reward > pos_threshold; negonly: reward <= 0."}
    )
    pos_threshold: float = field(default=0.75, metadata={"help": "posonly keeps reward > this."})
    reward_baseline: Literal["none", "prompt_mean"] = field(
        default="none", metadata={"help": "prompt_mean: subtract the mean reward of the prompt's responses."}
    )
    loss_type: Literal["ips", "topr", "topr_token", "rwr"] = field(
        default="ips",
        metadata={"help": "ips: clipped per-token ratio; topr: sequence ratio truncated at 1 on negative rewards "
                  "(arXiv 2503.14286); topr_token: the per-token variant; rwr: no ratio. See pipeline.losses."},
    )  # fmt: skip
    importance_logps: Literal["reference", "behaviour"] = field(
        default="reference",
        metadata={"help": "ρ's denominator. reference: the logp stage's stored log-probs (the data is taken as "
                          "sampled from the reference). behaviour: the log-probs each token was sampled with, "
                          "which `pipeline collect` stores (`behaviour_logps`): true off-policy weights π/μ. "
                          "The KL term is to the reference either way."},
    )  # fmt: skip
    is_clip_min: float | None = field(default=None, metadata={"help": "Lower clip of ρ (ips). Default none."})
    is_clip_max: float | None = field(default=1.2, metadata={"help": "Upper clip of ρ (ips)."})
    kl_coef: float = field(default=0.5, metadata={"help": "Weight of the KL term."})
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata={"help": "Per-token KL estimate."})
    kl_neg_discount: float = field(default=0.5, metadata={"help": "KL weight factor for negative rewards."})
    skip_missing: bool = field(default=False, metadata={"help": "Skip rows without stored logps (counted)."})
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Train on this many rows (after datafilter), drawn with the run's seed: a quick trial "
                  "on the real data. Default: all."},
    )  # fmt: skip
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on this many rows. Default: all."}
    )
    token_view_dir: str | None = field(
        default=None,
        metadata={"help": "Where the tokenized view of the data is cached (memory-mapped Arrow, built once and "
                  "shared by every rank and restart). Default: token_views/ in the logp store."},
    )  # fmt: skip
    allow_logp_dtype_mismatch: bool = field(
        default=False,
        metadata={"help": "Train on stored logps computed in another dtype than this run's (e.g. bf16 logps, fp32 "
                  "training): ρ is then off by the rounding of the other dtype. Recorded in run.json."},
    )  # fmt: skip
    logp_mismatch_threshold: float | None = field(
        default=LOGP_MISMATCH_THRESHOLD,
        metadata={"help": "Before the first update, the first batch's mean |log πθ − log π_ref| per response "
                  "token is measured (run.json: logp_mismatch). When the policy starts from the reference it "
                  "should be ~0; above this value the run stops. none: record only."},
    )  # fmt: skip
    lm_head_chunk: int = field(default=1024, metadata={"help": "Response tokens per lm_head chunk."})

    def __post_init__(self):
        super().__post_init__()
        self.remove_unused_columns = (
            False  # our collator needs ref_logps/reward, which the model does not take
        )
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}


def reward_options(args: IPSConfig) -> str:
    """The options that decide which rows and rewards are trained on, as the user set them."""
    said = [f"reward_key={args.reward_key}"]
    if args.datafilter != "none":
        said.append(f"datafilter={args.datafilter}"
                    + (f" (reward > {args.pos_threshold})" if args.datafilter == "posonly" else " (reward <= 0)"))  # fmt: skip
    if args.reward_baseline != "none":
        said.append(f"reward_baseline={args.reward_baseline}")
    return ", ".join(said)


def no_signal_message(args: IPSConfig, raw: np.ndarray, rows: int) -> str:
    """Every reward left is 0: say which options did it and how to get a signal back (`raw`: the `rows`
    rewards left, as read, before any baseline)."""
    if args.reward_baseline == "prompt_mean" and np.any(np.abs(raw) > NO_SIGNAL):
        why = ("reward_baseline=prompt_mean subtracted each prompt's mean from rewards that are equal within every "
               "prompt" + (f" once datafilter={args.datafilter} kept only rows with " + (
                   f"reward > {args.pos_threshold}" if args.datafilter == "posonly" else "reward <= 0")
                   if args.datafilter != "none" else ""))  # fmt: skip
        fix = "drop reward_baseline" + (" or datafilter" if args.datafilter != "none" else "")
    else:
        why, fix = (
            f"the column '{args.reward_key}' is 0 on every row kept",
            "use another reward_key or datafilter",
        )
    return (
        f"train: all {rows} rewards left are 0 (within {NO_SIGNAL:g}) after {reward_options(args)}: {why}; "
        f"the loss would learn nothing. {fix[0].upper()}{fix[1:]}"
    )
