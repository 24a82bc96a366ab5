"""Learning-rate schedules as picklable multipliers for ``torch.optim.lr_scheduler.LambdaLR``.

They are small callable objects (not closures), so the scheduler's state dict holds plain numbers
and resumes exactly from a checkpoint loaded with ``weights_only=True``.
"""

from __future__ import annotations

import math

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
    """Linear warmup, then cosine decay to ``final_fraction`` of the peak at ``total_steps``."""

    def __init__(self, warmup_steps: int, total_steps: int, final_fraction: float = 0.0):
        if total_steps <= warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.final_fraction = final_fraction

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def lambda_lr(optimizer: Optimizer, schedule: WarmupConstant | WarmupCosine) -> LambdaLR:
    """A per-step ``LambdaLR`` following ``schedule`` (Hydra: ``_partial_: true`` over ``optimizer``)."""
    return LambdaLR(optimizer, schedule)
