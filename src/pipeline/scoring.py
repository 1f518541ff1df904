"""Per-token log-probs of response tokens, without a `[batch, seq, vocab]` tensor.

The decoder's hidden states at the positions that predict response tokens are gathered first; only those
rows go through `lm_head`, a chunk at a time, and each chunk's log-softmax is reduced to the target's log-prob
(`logit[target] - logsumexp(logits)`) in fp32. Memory for the vocabulary projection is therefore
`chunk_tokens × vocab` whatever the batch. Used by the logp stage (no grad) and by training stages (grad).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.errors import PipelineError
from pipeline.tokenization import TokenizedSample


def check_scorable(model) -> None:
    """Models whose logits are post-processed after `lm_head` would be scored wrongly by the chunked path."""
    config = model.config
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1.0):
            raise PipelineError(f"model config sets '{attr}', which chunked scoring does not apply yet")


def token_budget_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices grouped longest-first so that (rows × longest row) stays within `token_budget`.

    A row longer than the budget gets a batch of its own. Deterministic for the same lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # rows arrive longest first, so the batch's padded width is its first row's length
        if current and (len(current) + 1) * lengths[current[0]] > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(samples: Sequence[TokenizedSample], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, : len(sample.input_ids)] = torch.tensor(sample.input_ids)
        mask[row, : len(sample.input_ids)] = 1
    return ids.to(device), mask.to(device)


def response_logps(
    model, samples: Sequence[TokenizedSample], pad_id: int, chunk_tokens: int = 1024
) -> list[torch.Tensor]:
    """Log-prob of every response token of each sample under `model` (fp32, one tensor per sample).

    Gradients flow when called with grad enabled (training); wrap in `torch.inference_mode()` to score.
    """
    device = next(model.parameters()).device
    ids, mask = collate(samples, pad_id, device)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    # position t predicts token t + 1: response tokens [p, n) are predicted from positions [p - 1, n - 1)
    rows, cols = [], []
    for row, sample in enumerate(samples):
        span = range(sample.prompt_len - 1, len(sample.input_ids) - 1)
        rows.extend([row] * len(span))
        cols.extend(span)
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    cols_t = torch.tensor(cols, dtype=torch.long, device=device)
    states = hidden[rows_t, cols_t]
    targets = ids[rows_t, cols_t + 1]
    lm_head = model.get_output_embeddings()
    pieces = []
    for start in range(0, len(targets), chunk_tokens):
        logits = lm_head(states[start : start + chunk_tokens]).float()
        picked = logits.gather(1, targets[start : start + chunk_tokens, None]).squeeze(1)
        pieces.append(picked - torch.logsumexp(logits, dim=-1))
    flat = torch.cat(pieces) if pieces else torch.zeros(0, device=device)
    return list(torch.split(flat, [s.response_len for s in samples]))
