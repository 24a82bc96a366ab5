"""Learning-rate schedules as picklable multipliers for ``torch.optim.lr_scheduler.LambdaLR``.

They are small callable objects (not closures), so the scheduler's state dict holds plain numbers
and resumes exactly from a checkpoint loaded with ``weights_only=True``.
"""

from __future__ import annotations

import math
import sys

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupConstant:
    """Linear warmup from 0 over ``warmup_steps``, then constant."""

    def __init__(self, warmup_steps: int = 0):
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return 1.0


class WarmupCosine:
    """Linear warmup, then cosine decay to ``final_fraction`` of the peak at ``total_steps``.

    A warmup as long as the run or longer (a smoke test: ``trainer.max_steps=10`` against the
    recipe's 100) is shortened to a tenth of the run, with a one-line warning, so that short runs
    still reach the peak and decay.
    """

    def __init__(self, warmup_steps: int, total_steps: int, final_fraction: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps ({total_steps}) must be at least 1: cosine decay needs trainer.max_steps")
        if warmup_steps >= total_steps:
            shortened = total_steps // 10
            _warn(f"warmup_steps {warmup_steps} >= the run's {total_steps} steps: warming up for {shortened} instead")
            warmup_steps = shortened
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.final_fraction = final_fraction

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def _warn(message: str) -> None:
    """One line on stderr from global rank 0 (every rank builds the schedule)."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(f"warning: {message}", file=sys.stderr)


def lambda_lr(optimizer: Optimizer, schedule: WarmupConstant | WarmupCosine) -> LambdaLR:
    """A per-step ``LambdaLR`` following ``schedule`` (Hydra: ``_partial_: true`` over ``optimizer``)."""
    return LambdaLR(optimizer, schedule)
