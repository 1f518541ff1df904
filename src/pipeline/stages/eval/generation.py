"""Answers: generated once per model, prompt and sampling settings, and cached on disk by model fingerprint."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.data import sha256_file, write_parquet_atomic
from pipeline.errors import PipelineError
from pipeline.generation import generate_answers, torch_dtype
from pipeline.models import check_model_dir
from pipeline.stages.eval.config import CACHE_FLUSH_PROMPTS, EvalConfig, ModelSpec, PromptItem
from pipeline.stages.eval.prompts import render_chat

logger = logging.getLogger("pipeline.eval")


_HASHES: dict[tuple[str, int, int], str] = {}


def _file_hash(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:  # a model listed twice (or judged again in-process) is hashed once
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def model_fingerprint(path: str, key: str = "models") -> str:
    """Hash of what decides a model's answers: config (or adapter config), weight files, tokenizer, and for a
    LoRA adapter its base model's fingerprint."""
    from transformers import AutoTokenizer

    from pipeline.tokenization import tokenizer_fingerprint

    folder = Path(path)
    weights = [
        p
        for p in folder.iterdir()
        if p.is_file()
        and (p.suffix == ".safetensors" or (p.suffix == ".bin" and p.name != "training_args.bin"))
    ]
    if not weights:
        raise PipelineError(f"{key}: '{path}' holds no weight files (*.safetensors or *.bin)")
    configs = [folder / n for n in ("config.json", "adapter_config.json") if (folder / n).is_file()]
    digest = hashlib.sha256()
    for p in sorted(configs + weights):
        digest.update(f"{p.name}:{_file_hash(p)}\n".encode())
    if (folder / "adapter_config.json").is_file():
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        check_model_dir(base, f"{key} (base model of the LoRA adapter '{path}')")
        digest.update(f"base:{model_fingerprint(base, key)}\n".encode())
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise PipelineError(
            f"{key}: cannot load the tokenizer of '{path}': {str(err).splitlines()[0]}"
        ) from None
    digest.update(f"tokenizer:{tokenizer_fingerprint(tokenizer)}\n".encode())
    return digest.hexdigest()[:16]


def sampling_settings(cfg: EvalConfig) -> dict[str, Any]:
    """The settings that decide the answers (greedy ignores top_p/top_k, so they do not split the cache)."""
    sampled = cfg.temperature > 0
    return {
        "temperature": float(cfg.temperature),
        "top_p": float(cfg.top_p) if sampled else 1.0,
        "top_k": int(cfg.top_k) if sampled else 0,
        "max_new_tokens": int(cfg.max_new_tokens),
        "num_samples": int(cfg.num_samples),
        "seed": int(cfg.seed) if sampled else 0,
    }


def _read_cache(path: Path, num_samples: int) -> dict[str, list[str]]:
    import pyarrow.parquet as pq

    if not path.is_file():
        return {}
    try:
        table = pq.read_table(path, columns=["prompt_key", "sample_index", "answer"]).to_pylist()
    except Exception as err:
        logger.warning("eval: ignoring unreadable answers cache %s (%s)", path, str(err).splitlines()[0])
        return {}
    by_key: dict[str, dict[int, str]] = defaultdict(dict)
    for row in table:
        by_key[row["prompt_key"]][row["sample_index"]] = row["answer"]
    return {
        k: [v[i] for i in range(num_samples)]
        for k, v in by_key.items()
        if all(i in v for i in range(num_samples))
    }


def _write_cache(
    path: Path, answers: dict[str, list[str]], ids: dict[str, str], spec: ModelSpec, settings: dict
) -> None:
    import pyarrow as pa

    rows = [
        {"prompt_key": k, "prompt_id": ids.get(k, ""), "sample_index": i, "answer": a}
        for k, samples in answers.items()
        for i, a in enumerate(samples)
    ]
    schema = pa.schema(
        [
            ("prompt_key", pa.string()),
            ("prompt_id", pa.string()),
            ("sample_index", pa.int32()),
            ("answer", pa.string()),
        ],
        metadata={
            "model_fingerprint": spec.fingerprint,
            "model_path": spec.path,
            "sampling": json.dumps(settings, sort_keys=True),
        },
    )
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=schema), path)


def answers_for(
    spec: ModelSpec, items: list[PromptItem], cfg: EvalConfig, cache_dir: Path
) -> dict[str, list[str]]:
    """prompt key -> answers of one model: from the cache where there, generated (and cached) otherwise."""
    from tqdm.auto import tqdm

    settings = sampling_settings(cfg)
    settings_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"answers-{spec.fingerprint}-{settings_key}.parquet"
    cached = _read_cache(path, cfg.num_samples)
    todo = [it for it in items if it.key not in cached]
    logger.info(
        "eval: %s: %d of %d prompts' answers in the cache %s",
        spec.name,
        len(items) - len(todo),
        len(items),
        path.name,
    )
    if todo:
        import torch

        tokenizer, model = _load_generator(spec, cfg)
        ids = {it.key: it.prompt_id for it in items}
        with tqdm(total=len(todo), desc=f"generating {spec.name}", unit="prompt") as bar:
            step = max(CACHE_FLUSH_PROMPTS, cfg.batch_size)
            for start in range(0, len(todo), step):
                chunk = todo[start : start + step]
                texts = [render_chat(tokenizer, it.messages) for it in chunk]
                kwargs = {
                    k: settings[k] for k in ("num_samples", "temperature", "top_p", "top_k", "max_new_tokens")
                }
                cut: list[bool] = []
                new = generate_answers(tokenizer, model, texts, batch_size=cfg.batch_size, seed=cfg.seed,
                                       progress=bar, cut=cut, **kwargs)  # fmt: skip
                spec.cut += sum(cut)
                for it, samples in zip(chunk, new, strict=True):
                    cached[it.key] = list(samples)
                _write_cache(path, cached, ids, spec, settings)  # a crash loses at most one chunk
        spec.generated = len(todo)
        if spec.cut:
            logger.warning("eval: %s: %d of the %d answers generated reached max_new_tokens (%d) without ending: "
                           "cut there (raise max_new_tokens to let them finish)", spec.name, spec.cut,
                           len(todo) * cfg.num_samples, cfg.max_new_tokens)  # fmt: skip
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {it.key: cached[it.key] for it in items}


def _load_generator(spec: ModelSpec, cfg: EvalConfig):
    import torch

    from pipeline.models import load_for_generation

    tokenizer, model = load_for_generation(spec.path, key="models", dtype=torch_dtype(cfg.dtype))
    if torch.cuda.is_available():
        model = model.to("cuda")
    return tokenizer, model
