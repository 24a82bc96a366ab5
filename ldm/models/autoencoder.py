"""The KL-regularised autoencoder (VAE) of latent diffusion (Rombach et al., 2022, Sec. 3.1).

Parameter names follow the original Stable Diffusion single-file layout (the part under
`first_stage_model.`), so SD weights load with `load_state_dict(..., strict=True)`:

    encoder.conv_in -> encoder.down.{i}.block.{j} / .attn.{j} / .downsample -> encoder.mid -> norm_out, conv_out
    quant_conv (moments)        post_quant_conv (latent -> decoder)
    decoder.conv_in -> decoder.mid -> decoder.up.{i}.block.{j} / .attn.{j} / .upsample -> norm_out, conv_out

Level i works at resolution `resolution / 2**i` in both halves; the decoder's `up` list is indexed the
same way as the encoder's `down` list (up.0 is the full-resolution level, run last).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# SD's VAE: GroupNorm(32 groups, eps 1e-6) everywhere; small VAEs (the toy's) may use fewer groups.
NORM_GROUPS = 32
NORM_EPS = 1e-6


def _norm(channels: int, groups: int = NORM_GROUPS) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (norm, SiLU, conv3x3) twice; 1x1 `nin_shortcut` when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = NORM_GROUPS):
        super().__init__()
        self.norm1 = _norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Absent (not an identity module) when widths match, so the state dict has no extra keys.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions; q, k, v and the output are 1x1 convs."""

    def __init__(self, channels: int, norm_groups: int = NORM_GROUPS):
        super().__init__()
        self.norm = _norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c, height, width = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head whose width is the full channel count.
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C), scale 1/sqrt(C)
        h = h.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv after zero padding right and bottom only (SD's choice)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks (each followed by attention if enabled), then a resampler.

    Holds `block`, `attn` and `downsample` or `upsample`, the names the SD checkpoint uses.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        use_attention: bool,
        resample: Literal["down", "up"] | None,
        dropout: float,
        norm_groups: int = NORM_GROUPS,
    ):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(
            ResnetBlock(widths[j], widths[j + 1], dropout, norm_groups) for j in range(num_blocks)
        )
        self.attn = nn.ModuleList(
            AttentionBlock(out_channels, norm_groups) for _ in range(num_blocks if use_attention else 0)
        )
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)
        self.resample = resample

    def forward(self, x: torch.Tensor, gradient_checkpointing: bool = False) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W'), H' = H/2, 2H or H."""
        for j, block in enumerate(self.block):
            x = _run(block, x, gradient_checkpointing)
            if self.attn:
                x = _run(self.attn[j], x, gradient_checkpointing)
        if self.resample == "down":
            x = self.downsample(x)
        elif self.resample == "up":
            x = self.upsample(x)
        return x


class MidBlock(nn.Module):
    """Residual block, attention, residual block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, norm_groups: int = NORM_GROUPS):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
        self.attn_1 = AttentionBlock(channels, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)

    def forward(self, x: torch.Tensor, gradient_checkpointing: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        for layer in (self.block_1, self.attn_1, self.block_2):
            x = _run(layer, x, gradient_checkpointing)
        return x


def _run(layer: nn.Module, x: torch.Tensor, gradient_checkpointing: bool) -> torch.Tensor:
    # Recompute activations in the backward pass instead of storing them (memory for ~30% more compute).
    if gradient_checkpointing and torch.is_grad_enabled():
        return checkpoint(layer, x, use_reentrant=False)
    return layer(x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f), f = 2**(levels - 1)."""

    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        channel_multipliers: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        resolution: int,
        z_channels: int,
        dropout: float,
        norm_groups: int = NORM_GROUPS,
    ):
        super().__init__()
        widths = [base_channels * m for m in channel_multipliers]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList(
            Level(
                in_channels=base_channels if i == 0 else widths[i - 1],
                out_channels=widths[i],
                num_blocks=num_res_blocks,
                use_attention=resolution // 2**i in attention_resolutions,
                resample="down" if i != last else None,
                dropout=dropout,
                norm_groups=norm_groups,
            )
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1], dropout, norm_groups)
        self.norm_out = _norm(widths[-1], norm_groups)
        # Mean and log-variance for every latent channel.
        self.conv_out = nn.Conv2d(widths[-1], 2 * z_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, base, H, W)
        for level in self.down:
            h = level(h, self.gradient_checkpointing)  # level i: width base*mult[i]; halves H, W except the last
        h = self.mid(h, self.gradient_checkpointing)  # (B, base*mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2*z, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_channels, h*f, w*f)."""

    def __init__(
        self,
        out_channels: int,
        base_channels: int,
        channel_multipliers: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        resolution: int,
        z_channels: int,
        dropout: float,
        norm_groups: int = NORM_GROUPS,
    ):
        super().__init__()
        widths = [base_channels * m for m in channel_multipliers]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], dropout, norm_groups)
        # Built in resolution order (up.0 = full resolution) to match the checkpoint; run in reverse.
        # One more block per level than the encoder, as in SD.
        self.up = nn.ModuleList(
            Level(
                in_channels=widths[i + 1] if i != last else widths[-1],
                out_channels=widths[i],
                num_blocks=num_res_blocks + 1,
                use_attention=resolution // 2**i in attention_resolutions,
                resample="up" if i != 0 else None,
                dropout=dropout,
                norm_groups=norm_groups,
            )
            for i in range(len(widths))
        )
        self.norm_out = _norm(widths[0], norm_groups)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, base*mult[-1], h, w)
        h = self.mid(h, self.gradient_checkpointing)
        for level in reversed(self.up):
            h = level(h, self.gradient_checkpointing)  # lowest resolution first, doubling as it goes
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out, h*f, w*f)


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))) from the encoder's moments.

    `parameters` is (B, 2C, h, w): mean then log-variance along dim 1. The log-variance is clamped to
    [-30, 20] as in LDM, so exp() stays finite in fp32.
    """

    def __init__(self, parameters: torch.Tensor):
        self.mean, logvar = parameters.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw z = mean + std * eps, (B, C, h, w); differentiable in mean and std."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The posterior mean, (B, C, h, w)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) summed over all non-batch dimensions, (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """The KL autoencoder of latent diffusion; defaults are SD 1.x/2.x's VAE (8x downsampling, 4 channels).

    Images are (B, in_channels, H, W) in [-1, 1] with H and W multiples of `downsampling_factor`.
    `scaling_factor` multiplies latents on their way to the diffusion model (1 / std of the latents
    over the data; 0.18215 for SD) and is a plain attribute, not part of the state dict.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 128,
        channel_multipliers: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (),  # resolutions (e.g. 32) with attention in the levels
        resolution: int = 256,  # only used to place `attention_resolutions`
        z_channels: int = 4,
        embed_dim: int = 4,
        dropout: float = 0.0,
        scaling_factor: float = 0.18215,
        gradient_checkpointing: bool = False,
        norm_groups: int = NORM_GROUPS,  # GroupNorm groups: 32 in SD; fewer lets small VAEs be narrow
    ):
        super().__init__()
        widths = [base_channels * m for m in channel_multipliers]
        if not widths or any(w % norm_groups for w in widths):
            raise ValueError(
                f"AutoencoderKL: every width base_channels * multiplier must be a multiple of {norm_groups} "
                f"(GroupNorm groups); got base_channels={base_channels}, channel_multipliers={tuple(channel_multipliers)}"
            )
        level_args = dict(
            base_channels=base_channels,
            channel_multipliers=tuple(channel_multipliers),
            num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(attention_resolutions),
            resolution=resolution,
            z_channels=z_channels,
            dropout=dropout,
            norm_groups=norm_groups,
        )
        self.encoder = Encoder(in_channels=in_channels, **level_args)
        self.decoder = Decoder(out_channels=out_channels, **level_args)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.scaling_factor = float(scaling_factor)
        self._num_levels = len(widths)
        self._embed_dim = embed_dim
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute block activations in backward to save memory (only where grad is enabled)."""
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side, 2**(number of levels - 1); 8 for SD."""
        return 2 ** (self._num_levels - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the diffusion model sees (embed_dim); 4 for SD."""
        return self._embed_dim

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image (B, 3, H, W) in [-1, 1] -> posterior over latents (B, embed_dim, H/f, W/f)."""
        return DiagonalGaussian(self.encode_moments(x))

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> the posterior's mean and log-variance, (B, 2 embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (B, embed_dim, h, w) -> image (B, 3, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct (B, 3, H, W) through a posterior sample (or its mean); returns (x_hat, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_to_latent(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> scaling_factor * z, z ~ q(z|x): the diffusion model's z_0."""
        return self.latent_from_moments(self.encode_moments(x), generator)

    def latent_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """`encode_moments`' output -> scaling_factor * z, z ~ q(z|x) (what `encode_to_latent` gives)."""
        return self.scaling_factor * DiagonalGaussian(moments).sample(generator)

    def decode_from_latent(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, embed_dim, h, w), as sampled by the diffusion model -> image (B, 3, h*f, w*f)."""
        return self.decode(z_scaled / self.scaling_factor)
