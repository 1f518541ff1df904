"""Finding and loading the models a stage is given: local folders only (no hub here), one clear line when a
folder is not what the option needs. Causal LMs (or a LoRA adapter on one) for generation, scalar reward
models for scoring."""

from __future__ import annotations

import functools
from pathlib import Path

from pipeline.data import read_json_object
from pipeline.errors import PipelineError


def check_model_dir(path: str | None, key: str = "model_name_or_path") -> str:
    """A local model folder (no hub here): one clear line instead of a loader traceback."""
    if not path:
        raise PipelineError(f"{key} is required (a local model folder; `pipeline tiny-model` makes one)")
    folder = Path(path)
    if not folder.is_dir():
        raise PipelineError(f"{key}: folder not found: '{path}'")
    if not any((folder / name).is_file() for name in ("config.json", "adapter_config.json", "tokenizer.json",
                                                       "tokenizer_config.json")):  # fmt: skip
        raise PipelineError(f"{key}: '{path}' holds no config.json or tokenizer files")
    return path


def check_reward_model_dir(path: str | None, key: str = "reward_model_path") -> str:
    """A local folder holding a scalar reward model: a `*ForSequenceClassification` with one label, or a
    LoRA adapter of task type SEQ_CLS (whose base folder must exist). One clear line otherwise."""
    check_model_dir(path, key)
    folder = Path(path)
    hint = "train one with `pipeline rm` or pass a *ForSequenceClassification folder"
    adapter_file = folder / "adapter_config.json"
    if adapter_file.is_file():
        adapter = read_json_object(adapter_file, key)
        task = adapter.get("task_type")
        if task != "SEQ_CLS":
            raise PipelineError(
                f"{key}: '{path}' is a LoRA adapter of task type {task}, not a reward model (SEQ_CLS); {hint}"
            )
        base = adapter.get("base_model_name_or_path")
        check_model_dir(base, f"{key} (base model of the LoRA adapter '{path}')")
        return path
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise PipelineError(f"{key}: '{path}' holds no config.json; {hint}")
    config = read_json_object(config_file, key)
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        causal = [a for a in architectures if a.endswith("ForCausalLM")]
        if causal:
            raise PipelineError(f"{key}: '{path}' is a causal LM ({causal[0]}), not a reward model; {hint}")
        found = ", ".join(architectures) if architectures else "no architectures in config.json"
        raise PipelineError(f"{key}: '{path}' has no sequence-classification head ({found}); {hint}")
    num_labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
    if num_labels != 1:
        raise PipelineError(
            f"{key}: '{path}' is a classifier with {num_labels} labels; a reward model has one scalar output "
            "(num_labels=1)"
        )
    return path


def load_reward_model(path: str, key: str = "reward_model_path", **kwargs):
    """(tokenizer, model) of a reward-model folder (full model or LoRA adapter + base), in eval mode, with
    `config.pad_token_id` set so batched scoring finds each sequence's last token. `kwargs` go to
    `from_pretrained` (e.g. `dtype`)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_reward_model_dir(path, key)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if (Path(path) / "adapter_config.json").is_file():
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model.eval()


def load_for_generation(model_dir: str, key: str = "--model", **kwargs):
    """Load tokenizer + causal LM (or base + LoRA adapter) from a local folder, in eval mode.

    `key` names the option in error messages; `kwargs` go to `from_pretrained` (e.g. `dtype`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise PipelineError(f"{key}: folder not found: '{model_dir}'")
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir, **kwargs)
    elif (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    else:
        raise PipelineError(f"{key}: '{model_dir}' holds neither config.json nor adapter_config.json")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer, model.eval()


def _part_of(name: str) -> str:
    """Which part of a decoder a parameter belongs to, from its name (llama, qwen, gpt-neox, gpt2, olmo...)."""
    low = name.lower()
    if "lm_head" in low or "embed_out" in low:
        return "lm_head"
    if "score" in low.split(".")[0]:
        return "score_head"
    if "embed" in low or "wte" in low or "wpe" in low:
        return "embedding"
    if "norm" in low or ".ln" in low:
        return "norms"
    if "attn" in low or "attention" in low:
        return "attention"
    if "mlp" in low or "feed_forward" in low or "experts" in low:
        return "mlp"
    return "other"


@functools.lru_cache(maxsize=32)
def _count_parameters_cached(folder: str, _stamp: tuple[int, int], classifier: bool) -> dict[str, int] | None:
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(folder)
        if classifier:
            config.num_labels = 1
        with torch.device("meta"):  # no memory is allocated, and no weights are read
            auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
            model = auto.from_config(config)
    except Exception:  # a config transformers cannot build: the caller falls back to its formulas
        return None
    counts = dict.fromkeys(("embedding", "attention", "mlp", "norms", "lm_head", "score_head", "other"), 0)
    for name, parameter in model.named_parameters():  # tied parameters are listed once
        counts[_part_of(name)] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


def count_parameters(folder: str | Path, classifier: bool = False) -> dict[str, int] | None:
    """The exact parameter count of the model a config.json describes, by part (embedding, attention, mlp,
    norms, lm_head, score_head, other, total): the model is built on the meta device, so even a 70B config
    costs seconds and no memory. `classifier`: the 1-label sequence classifier (a reward model or critic).
    None when transformers cannot build the config. Cached per folder and config.json version."""
    config = Path(folder) / "config.json"
    try:
        stat = config.stat()
    except OSError:
        return None
    return _count_parameters_cached(str(Path(folder).resolve()), (stat.st_mtime_ns, stat.st_size), classifier)
