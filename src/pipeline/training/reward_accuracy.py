"""Reward-model accuracy over pooled pairs, a tie counting ½.

TRL's `RewardTrainer` logs, per batch, the share of pairs with r(chosen) > r(rejected) and then averages the
batch means: a short last batch weighs as much as a full one, and a tie (an identical pair, or a head that
gives both sides one score) counts as wrong. `PooledAccuracyRewardTrainer` keeps every pair's score instead
(gathered over processes, the eval sampler's padding dropped), so the logged mean is over pairs:

    accuracy = (#{r_c > r_r} + ½ #{r_c = r_r}) / #pairs,   margin = mean over pairs of (r_c − r_r),
    ties = #{r_c = r_r} / #pairs.
"""

from __future__ import annotations

import torch
from trl import RewardTrainer


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 when chosen scores higher, ½ on a tie, 0 otherwise."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


class PooledAccuracyRewardTrainer(RewardTrainer):
    """`RewardTrainer` whose accuracy, margin and tie rate are means over pairs (see the module docstring)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)  # fmt: skip
        mode = "train" if self.model.training else "eval"
        with torch.no_grad():
            chosen, rejected = torch.chunk(outputs.logits.detach().squeeze(-1).float(), chunks=2)
            per_pair = {
                "accuracy": pair_accuracy(chosen, rejected),
                "margin": chosen - rejected,
                "ties": (chosen == rejected).float(),
            }
            for name, values in per_pair.items():
                gathered = self.accelerator.gather_for_metrics(values).tolist()
                logged = self._metrics[mode][name]
                if name != "ties" and logged:
                    logged.pop()  # TRL's batch mean, replaced by the batch's pairs
                logged.extend(gathered)
        return (loss, outputs) if return_outputs else loss
