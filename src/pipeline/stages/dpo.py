"""DPO stage: a thin wrapper around TRL's `DPOTrainer`, with the reference taken from our logp stage if asked.

    pipeline dpo --config recipes/demo/dpo.yaml [--loss_type sigmoid sft --loss_weights 1.0 1.0 --beta 0.1 ...]
    pipeline dpo --config recipes/demo/dpo.yaml --data_path runs/demo/prepare --ref_logps_dir runs/demo/logp
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml -m pipeline.cli dpo --config ...

Data: `train_data`/`eval_data` preference files (`prompt`/`chosen`/`rejected`, chat lists or text; TRL
tokenizes them), or `data_path`, a `pipeline prepare` output: its `pairs/` view is trained on, and every
chosen/rejected response is tokenized from its `rl/` row by `tokenize_prompt_response` — the function the
logp and IPS stages use — so stored reference log-probs line up token for token.

The reference, one of:
- default: a frozen copy of the starting model (with LoRA, `use_peft: true`, the base model with the adapter
  switched off — no copy is loaded);
- `ref_model_name_or_path`: another model folder;
- `precompute_ref_log_probs: true`: TRL scores the data once with the reference before training;
- `ref_logps_dir`: the output of `pipeline logp` on `data_path` — no reference forward at all, and the
  same stored logps serve IPS. The store must be bound to this run (`pipeline.logp_store`: reference model,
  tokenizer, `max_length`, compute dtype, the prepared rows), each response's token count must equal its
  stored logps', and none may be NaN/inf (else a one-line error). The loss is then TRL's with a live
  reference for every option: `ld_alpha` (LD-DPO) weights the stored per-token logps past the shorter
  response as TRL weights its own; `sync_ref_model` and `truncation_mode: keep_end` are refused.

Every TRL loss is available by name (`loss_type`, a list with `loss_weights` for mixtures). TRL logs
rewards/chosen, rewards/rejected, rewards/margins and rewards/accuracies; run.json holds eval loss, margin
and accuracy before and after training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from trl import DPOConfig, DPOTrainer, ModelConfig

from pipeline import outputs
from pipeline.configs import DataArguments, parse_stage_args
from pipeline.data import load_train_eval, prepared_shards
from pipeline.errors import PipelineError
from pipeline.logp_store import Expected, check_contract, read_store_manifest, training_dtype
from pipeline.models import check_model_dir
from pipeline.pair_view import first_pairs
from pipeline.runinfo import RunInfo, metrics_logging_callback, setup_logging, setup_tracking
from pipeline.training import (
    keep_bnb_4bit_trainable_on_cpu,
    model_init_kwargs,
    refuse_resuming_another_run,
    train_evaluate_save,
)

logger = logging.getLogger("pipeline.dpo")
EVAL_KEYS = ("rewards/margins", "rewards/accuracies")


@dataclass
class DPOStageConfig(DPOConfig):
    """`DPOConfig` plus where the data and the reference log-probs come from."""

    data_path: str | None = field(
        default=None, metadata={"help": "A `pipeline prepare` output: train on its pairs/ view (instead of train_data)."}
    )  # fmt: skip
    ref_logps_dir: str | None = field(
        default=None, metadata={"help": "A `pipeline logp` output for data_path: reference log-probs read, not computed."}
    )  # fmt: skip
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reference model folder. Default: the starting model (or LoRA's base)."},
    )
    token_view_dir: str | None = field(
        default=None,
        metadata={"help": "With data_path: where the tokenized pairs are cached (memory-mapped Arrow, built once "
                  "and shared by every rank and restart). Default: token_views/ in ref_logps_dir, else in data_path."},
    )  # fmt: skip
    allow_logp_dtype_mismatch: bool = field(
        default=False,
        metadata={"help": "With ref_logps_dir: accept logps computed in another dtype than this run's (e.g. bf16 "
                  "logps, fp32 training). Recorded in run.json."},
    )  # fmt: skip


class PipelineDPOTrainer(DPOTrainer):
    """TRL's trainer, except that datasets we tokenized ourselves, or that carry stored reference logps, are
    used as they are."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "chosen_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if "ref_chosen_logps" in dataset.column_names:
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)


def prepared_pairs(args: DPOStageConfig, split: str, tokenizer, logp_dir: str | None, state=None):
    """The pairs of a prepare output's split as token ids (plus summed stored ref logps): the split's
    tokenized view (`pipeline.token_view`, the rows tokenized as the logp and IPS stages do), paired by
    `pipeline.pair_view`; both cached on disk and memory-mapped."""
    from pipeline.pair_view import pair_view
    from pipeline.token_view import ViewRequest, token_view

    if not prepared_shards(args.data_path, "pairs", split):
        return None
    response_key = json.loads((Path(args.data_path) / "manifest.json").read_text())["columns"]["response"]
    request = ViewRequest(args.data_path, split, args.max_length, response_key, logp_dir, args.token_view_dir)
    view = token_view(request, tokenizer, state)
    if view is None:
        raise PipelineError(f"{args.data_path}: pairs/{split} has pairs but rl/{split} has no rows; re-run "
                            "`pipeline prepare` into a fresh output_dir")  # fmt: skip
    return pair_view(args.data_path, split, view, args.ld_alpha, logp_dir, state)


def stored_reference_logps(
    training_args: DPOStageConfig, model_args, tokenizer
) -> tuple[dict | None, dict | None]:
    """(the store's folder, run.json's `logp_contract`) from `ref_logps_dir` once the store is checked
    against this run and every option is one the stored logps can honour; (None, None) without it."""
    if not training_args.ref_logps_dir:
        return None, None
    from pipeline.tokenization import tokenizer_fingerprint

    if not training_args.data_path:
        raise PipelineError("ref_logps_dir needs data_path (the prepare output the logps were computed on)")
    for option, value, why in (
        ("sync_ref_model", training_args.sync_ref_model, "it updates the reference during training"),
        ("truncation_mode", training_args.truncation_mode if training_args.truncation_mode != "keep_start" else None,
         "stored logps cut the response, as the logp stage does, not the prompt's start"),
    ):  # fmt: skip
        if value:
            raise PipelineError(f"ref_logps_dir: {option}={value} cannot be honoured with stored reference logps "
                                f"({why}); drop it, or use a live reference (no ref_logps_dir)")  # fmt: skip
    if training_args.ref_model_name_or_path is None and model_args.use_peft:
        logger.info("dpo: stored logps stand for the reference; the LoRA base is not used as one")
    logp_dir = Path(training_args.ref_logps_dir)
    manifest = read_store_manifest(logp_dir, "ref_logps_dir")
    reference = training_args.ref_model_name_or_path or model_args.model_name_or_path
    expected = Expected(training_args.data_path, reference, tokenizer_fingerprint(tokenizer),
                        training_args.max_length, training_dtype(training_args, model_args))  # fmt: skip
    contract = check_contract(
        logp_dir, "ref_logps_dir", manifest, expected, training_args.allow_logp_dtype_mismatch
    )
    training_args.precompute_ref_log_probs = True  # the trainer then reads them from the batch
    return str(logp_dir), contract


def load_datasets(
    data_args: DataArguments, training_args: DPOStageConfig, tokenizer, logp_dir: str | None, state
):
    """(train, eval) pairs: from a prepare output (tokenized view, `max_*_samples` applied) or from
    preference files (TRL tokenizes those)."""
    if training_args.data_path:
        if not (Path(training_args.data_path) / "manifest.json").is_file():
            raise PipelineError(
                f"data_path '{training_args.data_path}': not a `pipeline prepare` output (no manifest.json)"
            )
        train_dataset = prepared_pairs(training_args, "train", tokenizer, logp_dir, state)
        if train_dataset is None:
            raise PipelineError(
                f"data_path '{training_args.data_path}': no pairs/train shards (prepare with views incl. pairs)"
            )
        eval_dataset = prepared_pairs(training_args, "eval", tokenizer, logp_dir, state)
        train_dataset = first_pairs(train_dataset, data_args.max_train_samples)  # nested, for every run seed
        eval_dataset = first_pairs(eval_dataset, data_args.max_eval_samples)
    else:
        train_dataset, eval_dataset = load_train_eval(data_args, training_args.seed)
        for name, dataset in (("train_data", train_dataset), ("eval_data", eval_dataset)):
            if dataset is not None and not {"chosen", "rejected"} <= set(dataset.column_names):
                source = data_args.train_data if name == "train_data" else data_args.eval_data
                raise PipelineError(f"{name} '{source}': a preference file needs columns 'chosen' and 'rejected' "
                                    f"(and 'prompt' unless it is implicit); found {dataset.column_names}")  # fmt: skip
    return train_dataset, eval_dataset


# the dataclasses a recipe of this stage fills (tests/test_configs.py parses every shipped recipe with them)
CONFIG_CLASSES = (DataArguments, DPOStageConfig, ModelConfig)


def main(argv: list[str] | None = None) -> dict:
    data_args, training_args, model_args = parse_stage_args(CONFIG_CLASSES, argv, "dpo")

    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import get_peft_config, get_quantization_config

    check_model_dir(model_args.model_name_or_path)
    if training_args.data_path and (data_args.train_data or data_args.eval_data):
        raise PipelineError(
            "data_path and train_data/eval_data are both set, and data_path (a prepare output) would be trained "
            "on; keep one (`--data_path ''` drops a recipe's data_path)"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    from accelerate import PartialState

    state = PartialState()
    with state.main_process_first():  # the reference's hash is computed once, then read from the cache
        logps, contract = stored_reference_logps(training_args, model_args, tokenizer)
    train_dataset, eval_dataset = load_datasets(data_args, training_args, tokenizer, logps, state)
    configs = (data_args, training_args, model_args)
    outputs.claim(training_args.output_dir, "dpo")
    refuse_resuming_another_run(
        training_args.output_dir, "dpo", configs, training_args.resume_from_checkpoint
    )
    log_path = setup_logging(training_args.output_dir)
    setup_tracking(training_args.report_to, training_args.output_dir)
    run = RunInfo(training_args.output_dir, "dpo", configs, training_args.seed)
    logger.info("dpo: output_dir=%s log=%s; %d train pairs, %s eval pairs", training_args.output_dir, log_path,
                len(train_dataset), len(eval_dataset) if eval_dataset else 0)  # fmt: skip
    set_seed(training_args.seed)
    if eval_dataset is None and training_args.eval_strategy != "no":
        training_args.eval_strategy = "no"

    quantization_config = get_quantization_config(model_args)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    ref_model = None
    if training_args.ref_model_name_or_path and logps is None:
        check_model_dir(training_args.ref_model_name_or_path, "ref_model_name_or_path")
        ref_model = AutoModelForCausalLM.from_pretrained(
            training_args.ref_model_name_or_path, dtype=model_args.dtype or "auto"
        )

    trainer = PipelineDPOTrainer(
        model=model_args.model_name_or_path,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=quantization_config,
        callbacks=[metrics_logging_callback(logging.getLogger("pipeline.dpo.metrics"))],
    )
    if quantization_config is not None:
        keep_bnb_4bit_trainable_on_cpu(trainer.model)

    metrics: dict = {"train_pairs": len(train_dataset), "eval_pairs": len(eval_dataset) if eval_dataset else 0,
                     "reference": "stored logps" if logps is not None else (
                         training_args.ref_model_name_or_path or "starting model")}  # fmt: skip
    if contract is not None:
        metrics["logp_contract"] = contract
    return train_evaluate_save(trainer, run, metrics, training_args.output_dir,
                               training_args.resume_from_checkpoint, eval_keys=EVAL_KEYS,
                               merge_lora=data_args.merge_lora, save_every_minutes=data_args.save_every_minutes)  # fmt: skip
