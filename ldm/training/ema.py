"""Exponential moving average of the trained weights (torch's AveragedModel with a warmup decay)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


class EMADecay:
    """The multi-tensor update of ``AveragedModel``: ema <- d ema + (1 - d) param.

    With warmup the decay is min(decay, (1 + n) / (10 + n)) after n updates, so early EMA weights
    are not dominated by the random init (as in Karras et al. 2024's power EMA for short runs; the
    (1+n)/(10+n) form is the one of TensorFlow's ExponentialMovingAverage with num_updates).
    Kept as tensors to avoid a host sync per step.
    """

    def __init__(self, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup

    def __call__(self, ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        decay = torch.full_like(num_averaged, self.decay, dtype=torch.float32)
        if self.warmup:
            n = num_averaged.float()
            decay = torch.minimum(decay, (1 + n) / (10 + n))
        if not ema_params[0].is_floating_point():  # AveragedModel groups tensors by dtype
            torch._foreach_copy_(ema_params, params)
            return
        torch._foreach_lerp_(ema_params, params, (1 - decay).to(ema_params[0].dtype))


def build_ema(module: nn.Module, decay: float, warmup: bool = True) -> AveragedModel:
    """A frozen averaged copy of ``module`` (buffers averaged too) updated by ``update_parameters``."""
    ema = AveragedModel(module, multi_avg_fn=EMADecay(decay, warmup), use_buffers=True)
    ema.requires_grad_(False)
    return ema
