"""Generation with `transformers`: answers to rendered prompts (`generate_answers`, used by `eval`), and samples
with the log-probability each token was drawn with (`sample_with_logps`, used by `collect`).

Sampling knobs are always set explicitly, so a model's own `generation_config.json` never changes what was
asked for. A batch is seeded from `seed` and its texts: the same batch gives the same answers whatever else
is generated around it (and however the work is split over processes).

**The behaviour policy μ, exactly.** `sample_with_logps` asks `generate` for plain sampling (temperature 1,
no top-k/top-p) and applies temperature, top-k and top-p itself, as transformers' own warpers, followed by a
recorder: the distribution the recorder sees is the one the token is drawn from, so the stored log-prob of
each token is log μ(token) under the sampling settings. (transformers places custom processors before its
own warpers, so a recorder behind warpers it did not apply itself would see the wrong distribution.) Only
one step's log-softmax is held at a time: memory does not grow with the vocabulary times the length.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.stats import stable_seed


def torch_dtype(name: str):
    """`auto` (bf16 where the GPU supports it, else fp32) or a torch dtype by name."""
    import torch

    if name == "auto":
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return getattr(torch, name)


def _eos_ids(tokenizer, model) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    return eos_ids


def _generation_config(tokenizer, eos_ids, max_new_tokens, num_samples, sampled, temperature, top_p, top_k):
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampled,
        temperature=temperature if sampled else 1.0,
        top_p=top_p if sampled else 1.0,
        top_k=top_k if sampled else 50,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids or None,
    )


def _left_padded(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def _generated_batches(tokenizer, model, texts, batch_size, seed, config, processors=None):
    """Each batch of rendered prompts, left-padded, seeded from `seed` and its texts (the same batch gives the
    same output), generated: yields (batch, the new token ids, the batch's logits processors)."""
    import torch
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        extra = processors() if processors else []
        torch.manual_seed(stable_seed(seed, batch))
        with torch.no_grad():
            out = model.generate(**enc, generation_config=config, logits_processor=LogitsProcessorList(extra))
        yield batch, out[:, enc["input_ids"].shape[1] :], extra


def generate_answers(
    tokenizer,
    model,
    texts: list[str],
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    progress=None,
    cut: list[bool] | None = None,
) -> list[list[str]]:
    """`num_samples` answers to each rendered prompt, batched with left padding, decoded without special
    tokens. Each batch is seeded from `seed` and its texts, so the same batch gives the same answers.
    `cut`, if given, gets one flag per answer: it reached max_new_tokens without an EOS."""
    import torch

    _left_padded(tokenizer)
    sampled = temperature > 0
    eos_ids = _eos_ids(tokenizer, model)
    config = _generation_config(
        tokenizer, eos_ids, max_new_tokens, num_samples, sampled, temperature, top_p, top_k
    )
    answers: list[list[str]] = []
    for batch, new, _ in _generated_batches(tokenizer, model, texts, batch_size, seed, config):
        decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
        if cut is not None:
            ended = torch.isin(new, torch.tensor(eos_ids or [-1], device=new.device)).any(dim=1)
            cut.extend((~ended & (new.shape[1] >= max_new_tokens)).tolist())
        answers += [decoded[i * num_samples : (i + 1) * num_samples] for i in range(len(batch))]
        if progress is not None:
            progress.update(len(batch))
    return answers


@dataclass
class Sample:
    """One sampled answer: its token ids (up to and including the EOS that ended it), its text (special
    tokens left out) and the log-prob each token was drawn with."""

    token_ids: list[int]
    text: str
    logps: list[float]
    finish_reason: str  # "eos" or "length" (max_new_tokens reached)


class _Recorder:
    """The last logits processor: keeps the log-softmax of the distribution each step samples from, and
    reads off the log-prob of the token drawn (which the next step's input ends with)."""

    def __init__(self):
        self.previous = None
        self.steps: list = []

    def __call__(self, input_ids, scores):
        import torch

        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens):
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
            self.previous = None


def sample_with_logps(
    tokenizer,
    model,
    texts: list[str],
    *,
    num_samples: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    progress=None,
) -> list[list[Sample]]:
    """`num_samples` samples per rendered prompt with the exact log-prob of every token drawn (see the
    module docstring). Needs temperature > 0: greedy decoding is a point mass, not a distribution."""
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if temperature <= 0:
        raise ValueError("sample_with_logps samples: temperature must be > 0")
    _left_padded(tokenizer)
    eos_ids = _eos_ids(tokenizer, model)
    config = _generation_config(tokenizer, eos_ids, max_new_tokens, num_samples, True, 1.0, 1.0, 0)
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    out_samples: list[list[Sample]] = []
    batches = _generated_batches(
        tokenizer, model, texts, batch_size, seed, config, lambda: [*warpers, _Recorder()]
    )
    for batch, new_ids, processors in batches:
        recorder = processors[-1]
        recorder.finish(new_ids[:, -1])
        new = new_ids.tolist()
        logps = torch.stack(recorder.steps, dim=1).tolist() if recorder.steps else [[] for _ in new]
        samples = [_trim(tokenizer, ids, lp, eos_ids) for ids, lp in zip(new, logps, strict=True)]
        out_samples += [samples[i * num_samples : (i + 1) * num_samples] for i in range(len(batch))]
        if progress is not None:
            progress.update(len(batch))
    return out_samples


def _trim(tokenizer, ids: list[int], logps: list[float], eos_ids: list[int]) -> Sample:
    """Cut a generated row after its first EOS (what follows is padding)."""
    end = next((i + 1 for i, t in enumerate(ids) if t in eos_ids), None)
    reason = "eos" if end is not None else "length"
    end = end or len(ids)
    ids, logps = ids[:end], logps[:end]
    return Sample(ids, tokenizer.decode(ids, skip_special_tokens=True), [float(x) for x in logps], reason)
