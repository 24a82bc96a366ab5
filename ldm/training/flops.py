"""FLOP counts for model-FLOPs utilisation (MFU)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def unet_training_flops(
    unet: nn.Module, latent_shape: tuple[int, ...], context_shape: tuple[int, ...], batch_size: int
) -> float:
    """FLOPs of one forward + backward of ``unet`` on a batch: 3 x the counted forward FLOPs.

    The forward is counted on one sample on the meta device (no compute, no memory), which is
    exact for convolutions, matmuls and attention (the FLOP counter's ops), and scaled by the batch.
    """
    device = next(unet.parameters()).device
    x = torch.zeros(1, *latent_shape, device=device)
    context = torch.zeros(1, *context_shape, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, context)
    return 3.0 * counter.get_total_flops() * batch_size
