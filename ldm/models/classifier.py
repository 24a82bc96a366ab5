"""A noise-aware classifier of noisy latents z_t, for classifier guidance (Dhariwal & Nichol 2021, Sec. 4).

It is the encoder half of our U-Net (``ResBlock``s fed the sinusoidal time embedding, ``Downsample``
between levels), without attention or text: the class must be read from z_t alone. The features are
average-pooled to a small fixed grid rather than to one vector, so that *where* something is (the
toy's position) survives the pooling, and one linear head per attribute reads them. ADM's classifier
gets the same from attention pooling with a positional embedding; a fixed grid is simpler and enough
for small latents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.attention import GroupNorm32
from ldm.models.unet import Downsample, ResBlock, timestep_embedding


class NoisyClassifier(nn.Module):
    """Logits per attribute for noisy latents at their timesteps.

    ``heads`` maps each attribute to its number of classes, e.g. ``{"colour": 7, "shape": 3,
    "position": 5}`` for the toy. Levels as in ``UNetModel``: ``channel_multipliers`` x
    ``model_channels`` channels, ``num_res_blocks`` ResBlocks each, a 2x downsampling between levels.
    """

    def __init__(
        self,
        heads: Mapping[str, int],
        in_channels: int = 4,
        model_channels: int = 32,
        channel_multipliers: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        norm_groups: int = 8,
        dropout: float = 0.0,
        pool_size: int = 4,  # features are averaged to pool_size x pool_size cells before the heads
    ) -> None:
        super().__init__()
        if not heads or any(int(n) < 2 for n in heads.values()):
            raise ValueError(f"NoisyClassifier: every head needs at least 2 classes, got {dict(heads)}")
        self.heads_classes = {str(name): int(n) for name, n in heads.items()}
        # the constructor arguments besides heads, as plain values (what a checkpoint's spec stores)
        self.config = dict(
            in_channels=in_channels,
            model_channels=model_channels,
            channel_multipliers=list(channel_multipliers),
            num_res_blocks=num_res_blocks,
            norm_groups=norm_groups,
            dropout=dropout,
            pool_size=pool_size,
        )
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.pool_size = pool_size
        time_embed_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.blocks = nn.ModuleList()
        ch = model_channels
        for level, mult in enumerate(channel_multipliers):
            for _ in range(num_res_blocks):
                self.blocks.append(ResBlock(ch, time_embed_dim, mult * model_channels, dropout, norm_groups))
                ch = mult * model_channels
            if level < len(channel_multipliers) - 1:
                self.blocks.append(Downsample(ch))
        self.out = nn.Sequential(GroupNorm32(norm_groups, ch), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(ch * pool_size**2, n) for name, n in self.heads_classes.items()})

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, in_channels, h, w) noisy latents; timesteps: (B,). Returns {attribute: logits (B, classes)}."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))  # (B, 4 C)
        h = self.conv_in(x)  # (B, C, h, w)
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)  # (B, C_level, h / 2^level, w / 2^level)
        h = F.adaptive_avg_pool2d(self.out(h), self.pool_size).flatten(1)  # (B, C_last * pool^2)
        return {name: head(h) for name, head in self.heads.items()}
