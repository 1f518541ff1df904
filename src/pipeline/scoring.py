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


def chunked_token_logps(
    lm_head, states: torch.Tensor, targets: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """log softmax(lm_head(states))[targets] in fp32, `chunk_tokens` rows at a time.

    With gradients enabled each chunk is checkpointed: backward recomputes the chunk's logits instead of
    keeping `tokens × vocab` of them alive.
    """
    from torch.utils.checkpoint import checkpoint

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = lm_head(h).float()
        return logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    training = torch.is_grad_enabled() and states.requires_grad
    out = [
        checkpoint(piece, states[s : s + chunk_tokens], targets[s : s + chunk_tokens], use_reentrant=False)
        if training
        else piece(states[s : s + chunk_tokens], targets[s : s + chunk_tokens])
        for s in range(0, len(targets), chunk_tokens)
    ]
    return torch.cat(out) if out else states.new_zeros(0, dtype=torch.float32)


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
    states, targets = hidden[rows_t, cols_t], ids[rows_t, cols_t + 1]
    flat = chunked_token_logps(model.get_output_embeddings(), states, targets, chunk_tokens)
    return list(torch.split(flat, [s.response_len for s in samples]))


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """First-fit-decreasing: sample indices grouped into rows of at most `row_tokens` tokens.

    A sample longer than `row_tokens` gets a row of its own. Deterministic for the same lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(max(0, row_tokens - lengths[i]))
    return rows


def packed_response_logps(
    model, samples: Sequence[TokenizedSample], pad_id: int, chunk_tokens: int = 1024
) -> list[torch.Tensor]:
    """`response_logps` for samples packed end to end into one row each per entry of a batch, padding-free.

    Documents are kept apart by `position_ids` that restart at 0 for each sample, with no attention mask and
    no KV cache (transformers then builds a block-diagonal causal mask; with `flex_attention` it never
    computes the blocks across documents). `samples` is a list of rows, each a list of samples.
    """
    device = next(model.parameters()).device
    width = max(sum(len(s.input_ids) for s in row) for row in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(samples), width), dtype=torch.long)
    rows, cols, sizes = [], [], []
    for r, row in enumerate(samples):
        offset = 0
        for sample in row:
            n = len(sample.input_ids)
            ids[r, offset : offset + n] = torch.tensor(sample.input_ids)
            positions[r, offset : offset + n] = torch.arange(n)
            span = range(offset + sample.prompt_len - 1, offset + n - 1)
            rows.extend([r] * len(span))
            cols.extend(span)
            sizes.append(sample.response_len)
            offset += n
        # the tail padding is one more "document" whose outputs are never read
        positions[r, offset:] = torch.arange(width - offset)
    ids, positions = ids.to(device), positions.to(device)
    hidden = model.base_model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    cols_t = torch.tensor(cols, dtype=torch.long, device=device)
    states, targets = hidden[rows_t, cols_t], ids[rows_t, cols_t + 1]
    flat = chunked_token_logps(model.get_output_embeddings(), states, targets, chunk_tokens)
    return list(torch.split(flat, sizes))
