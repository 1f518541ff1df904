"""IPSTrainer: TRL's SFTTrainer with the IPS loss, and the step-0 check that the stored logps belong to
the policy it starts from."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
from trl import SFTTrainer

from pipeline.errors import PipelineError
from pipeline.logp_store import model_fingerprint
from pipeline.losses import IPSLossConfig, ips_loss
from pipeline.scoring import chunked_token_logps

logger = logging.getLogger("pipeline.ips")


@dataclass
class MismatchCheck:
    """The step-0 check's setting and outcome (`record` is run.json's `logp_mismatch`)."""

    starts_from_reference: bool
    record: dict
    done: bool = False


def starts_from_reference(model_dir: str, reference: str, reference_fingerprint: str | None) -> bool:
    """Whether the policy's starting weights are the reference's (the same folder or the same files)."""
    if os.path.realpath(model_dir) == os.path.realpath(reference):
        return True
    try:
        return reference_fingerprint is not None and model_fingerprint(model_dir) == reference_fingerprint
    except PipelineError:  # an adapter folder: not the reference's files
        return False


class IPSTrainer(SFTTrainer):
    """TRL's SFTTrainer (model loading, PEFT, DeepSpeed, logging) with the IPS loss."""

    def __init__(self, *args, loss_config: IPSLossConfig, lm_head_chunk: int, mismatch: MismatchCheck,
                 **kwargs):  # fmt: skip
        # Two SFTConfig fields mean something else here and SFTTrainer validates them at init: `loss_type`
        # (TRL knows nll/dft; ours is in `loss_config`) and `padding_free` (TRL refuses a custom collator
        # with it; our collator implements it). Show SFTTrainer values it accepts, then put ours back.
        config = kwargs["args"]
        ours = {"loss_type": config.loss_type, "padding_free": config.padding_free}
        config.loss_type, config.padding_free = "nll", False
        try:
            super().__init__(*args, **kwargs)
        finally:
            for key, value in ours.items():
                setattr(config, key, value)
        self.loss_config, self.lm_head_chunk, self.mismatch = loss_config, lm_head_chunk, mismatch
        self._tokens, self._clock = 0, time.time()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        forward = {k: inputs[k] for k in ("attention_mask", "position_ids") if k in inputs}
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1, **forward)
        hidden = out.hidden_states[-1]
        mask = inputs["response_mask"]
        samples, cols = torch.nonzero(mask, as_tuple=True)  # response token j of sample b ...
        rows = inputs["row"][samples]  # ... sits in row `row[b]` at start[b] + prompt_len[b] + j
        positions = inputs["start"][samples] + inputs["prompt_len"][samples] + cols
        lm_head = self.accelerator.unwrap_model(model).get_output_embeddings()
        flat = chunked_token_logps(
            lm_head, hidden[rows, positions - 1], ids[rows, positions], self.lm_head_chunk
        )
        policy = torch.zeros(mask.shape, dtype=torch.float32, device=flat.device).index_put(
            (samples, cols), flat
        )
        mode = "train" if model.training else "eval"
        if mode == "train" and not self.mismatch.done:
            self.check_start_mismatch(
                policy.detach(), inputs["ref_logps"], mask, inputs.get("behaviour_logps")
            )
        loss, stats = ips_loss(policy, inputs["ref_logps"], mask, inputs["reward"], self.loss_config,
                               inputs.get("behaviour_logps"))  # fmt: skip
        for key, value in stats.items():
            if torch.isfinite(value):
                self._metrics[mode][f"ips/{key}"].append(value.item())
        if mode == "train":
            self._tokens += int(mask.sum())
            elapsed = time.time() - self._clock
            self._metrics[mode]["ips/response_tokens_per_s"].append(self._tokens / max(elapsed, 1e-9))
        return (loss, out) if return_outputs else loss

    def check_start_mismatch(self, policy: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor,
                             behaviour: torch.Tensor | None = None) -> None:  # fmt: skip
        """Before the first update: how far the policy's log-probs of its first batch (all ranks) are from the
        stored ones. Recorded in run.json and the tracker; when the policy starts from the reference, where
        ρ = 1 on every token, a mean |log ρ| above the threshold stops the run. With behaviour log-probs, the
        mean |log π/μ| is recorded too (0 when the policy is the sampler at temperature 1)."""
        check = self.mismatch
        check.done = True
        if self.state.global_step > 0:
            check.record.update(
                skipped=f"resumed at step {self.state.global_step}: the policy is not the reference"
            )
            return
        log_ratio = (policy - ref)[mask]
        local = torch.stack([log_ratio.abs().sum(), (torch.exp(log_ratio) - 1 - log_ratio).sum(),
                             log_ratio.new_tensor(float(log_ratio.numel())),
                             log_ratio.abs().max() if log_ratio.numel() else log_ratio.new_zeros(())]).double()  # fmt: skip
        every = self.accelerator.gather(local[None]).reshape(-1, 4)
        tokens = max(float(every[:, 2].sum()), 1.0)
        stats = {"mean_abs_log_ratio": float(every[:, 0].sum()) / tokens, "max_abs_log_ratio": float(every[:, 3].max()),
                 "k3_kl": float(every[:, 1].sum()) / tokens, "tokens": int(tokens)}  # fmt: skip
        if behaviour is not None and self.state.global_step == 0:
            far = (policy - behaviour)[mask].abs()
            both = self.accelerator.gather(
                torch.stack([far.sum(), far.new_tensor(float(far.numel()))])[None].double()
            )
            stats["behaviour_mean_abs_log_ratio"] = float(both[:, 0].sum()) / max(
                float(both[:, 1].sum()), 1.0
            )
        check.record.update(stats)
        for key in ("mean_abs_log_ratio", "max_abs_log_ratio", "k3_kl"):
            self._metrics["train"][f"logp_mismatch/{key}"].append(stats[key])
        logger.info("ips: step-0 logp mismatch over %d tokens: mean |log ρ| %.3g, max %.3g, k3 KL %.3g",
                    stats["tokens"], stats["mean_abs_log_ratio"], stats["max_abs_log_ratio"], stats["k3_kl"])  # fmt: skip
        threshold = check.record.get("threshold")
        if check.starts_from_reference and threshold is not None and stats["mean_abs_log_ratio"] > threshold:
            raise PipelineError(
                f"step 0: the policy starts from the reference, yet its log-probs of the first batch differ from "
                f"the stored ones by {stats['mean_abs_log_ratio']:.3g} per token on average (max "
                f"{stats['max_abs_log_ratio']:.3g}; logp_mismatch_threshold {threshold:g}), where they should agree; "
                "the stored logps do not belong to this model, data or precision: recompute them with `pipeline "
                "logp`, or raise logp_mismatch_threshold (none: record only)"
            )
