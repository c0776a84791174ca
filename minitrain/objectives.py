"""The objective seam: what a unit of data is, what it costs the planner, how a micro-step's pack is built, what its
loss is, and what the step's loss is divided by.

The loop (train.py) does the same thing for every objective: it asks for the step's denominator (`step_units`,
known on every rank from the plan and the cache), runs `loss_sum` on each of this rank's packs and backpropagates

    loss_sum * world_size / step_units

FSDP averages gradients over the ranks, so the sum of those is exactly the gradient of (step's loss sum) /
step_units, however the step is split into ranks and micro-steps.

An objective is a small object with these members:

    name            the --objective value
    unit            what the denominator counts (printed and logged)
    costs(cache)    the planner's cost of each sample (tokens of its packed row)
    step_units(cache, indices)   the step's denominator over its sample indices (all ranks, all micro-steps)
    pack(cache, indices)         one micro-step's input (data.Pack)
    loss_sum(model, pack, cache, indices, row_ce=None)   the summed loss of the pack, a scalar tensor with gradient

`SFT` is the mean cross-entropy over the step's trained tokens (--loss-reduction tokens), or over its samples of
each sample's token mean (--loss-reduction sequences, torchllms' `sequences`: the denominator is the step's samples,
not its packs, so a pack's size never weighs in). Preference objectives (a chosen + rejected pair as the unit)
plug in here.
"""

from dataclasses import dataclass

import numpy as np
import torch

from minitrain.data import Pack, TokenCache, make_pack

OBJECTIVES = ("sft",)
LOSS_REDUCTIONS = ("tokens", "sequences")


@dataclass(frozen=True)
class SFT:
    """Supervised fine-tuning. tokens: sum of CE over the step's trained tokens / its trained tokens. sequences:
    sum over the step's samples of (the sample's CE sum / its trained tokens) / the step's samples."""

    reduction: str = "tokens"
    name: str = "sft"

    @property
    def unit(self) -> str:
        return "trained tokens" if self.reduction == "tokens" else "samples"

    def costs(self, cache: TokenCache) -> np.ndarray:
        return cache.lengths

    def step_units(self, cache: TokenCache, indices: np.ndarray) -> int:
        if self.reduction == "sequences":
            return len(indices)
        return int(cache.trained[indices].sum())  # > 0: every cached sample trains at least one token

    def pack(self, cache: TokenCache, indices: np.ndarray) -> Pack:
        return make_pack(cache, indices)

    def loss_sum(self, model: torch.nn.Module, pack: Pack, cache: TokenCache, indices: np.ndarray,
                 row_ce: torch.Tensor | None = None) -> torch.Tensor:
        """`row_ce` (N,), when given, receives each target's plain CE (for metrics)."""
        weights = None
        if self.reduction == "sequences":  # each target weighs 1 / (trained tokens of its sample)
            per_sample = 1.0 / cache.trained[np.asarray(indices, dtype=np.int64)]
            weights = torch.from_numpy(per_sample[pack.sample_of_target]).float().to(pack.targets.device)
        return model(pack.input_ids, pack.position_ids, pack.positions, pack.targets, weights, row_ce,
                     pack.cu_seq_lens, pack.max_length)


def build_objective(name: str, loss_reduction: str = "tokens") -> SFT:
    return {"sft": SFT}[name](loss_reduction)
