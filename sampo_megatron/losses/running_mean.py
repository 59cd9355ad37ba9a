"""Running mean of implicit rewards across steps (BCO's ``delta``), identical on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.vocab_parallel import _group_size


class RunningMean:
    """Count-weighted mean of every reward seen so far.

    Args:
        group: process group whose ranks each see a different share of the batch (data parallel);
            their sums and counts are added so all ranks hold the same mean.
    """

    def __init__(self, group=None) -> None:
        self.group = group
        self.total = 0.0
        self.count = 0

    def update(self, values: torch.Tensor) -> float:
        """Fold in a batch of values and return the new mean."""
        stats = torch.tensor([values.detach().double().sum().item(), values.numel()], dtype=torch.float64)
        if _group_size(self.group) > 1:
            dist.all_reduce(stats, group=self.group)
        self.total += stats[0].item()
        self.count += int(stats[1].item())
        return self.mean

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count = float(state["total"]), int(state["count"])
