"""The conditional U-Net of latent diffusion (Rombach et al., 2022), as used by Stable Diffusion 1.x / 2.x.

It maps a noisy latent, its timestep and a text context to a tensor of the latent's shape; what that
tensor means (eps, v or x0) is the training objective's business, not the network's.

Parameter names follow the original single-file layout (`openaimodel.py` in CompVis/stable-diffusion
and Stability-AI/stablediffusion): under the checkpoint prefix `model.diffusion_model.`, an SD 1.x or
2.x U-Net state dict loads with strict=True into the `UNetModel` of `configs/model/sd15.yaml` /
`sd21_base.yaml` (the published sizes are written down there only; ``ldm.formats.architecture``
reads them back from a file's weights).
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.models.attention import GroupNorm32, SpatialTransformer


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, SD's convention.

    timesteps: (B,). Returns (B, dim) = cat([cos(t * f), sin(t * f)]) with f_i = max_period^(-i / half),
    i < half = dim // 2 (Vaswani et al., 2017, Sec. 3.5); an odd `dim` gets a zero last column.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )  # (half,)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))  # (B, dim)
    return embedding


class ResBlock(nn.Module):
    """Residual block with two 3x3 convolutions and the time embedding added in between (Ho et al., 2020)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        norm_groups: int = 32,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.gradient_checkpointing = gradient_checkpointing
        self.in_layers = nn.Sequential(
            GroupNorm32(norm_groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, kernel_size=3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )
        # Zero-init: a new block starts as its skip connection, which keeps deep U-Nets trainable.
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        if out_channels != channels:
            self.skip_connection = nn.Conv2d(channels, out_channels, kernel_size=1)
        else:
            self.skip_connection = nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); emb: (B, emb_channels). Returns (B, out_channels, H, W)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C_out, H, W)
        h = self.out_layers(h)  # (B, C_out, H, W)
        return self.skip_connection(x) + h  # (B, C_out, H, W)


class Downsample(nn.Module):
    """Halves the resolution with a stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""
        return self.op(x)


class Upsample(nn.Module):
    """Doubles the resolution: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNetBlock(nn.Sequential):
    """One entry of `input_blocks` / `middle_block` / `output_blocks` (SD's `TimestepEmbedSequential`):
    runs its layers in order, handing the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); emb: (B, E); context: (B, L, D). Returns (B, C', H', W')."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ContextPooling(nn.Module):
    """Attention pooling of the text context into one vector added to the time embedding (Imagen,
    Saharia et al. 2022, Sec. 2.4): a learned query attends over the tokens, so every ResBlock sees a
    global summary of the prompt, not only the spatial transformers. Not part of SD 1.x / 2.x.
    The output projection starts at zero: at init the U-Net is the plain one."""

    def __init__(self, context_dim: int, num_heads: int, out_dim: int) -> None:
        super().__init__()
        if context_dim % num_heads:
            raise ValueError(f"ContextPooling: context_dim {context_dim} does not split into {num_heads} heads")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.randn(context_dim) * context_dim**-0.5)
        self.to_kv = nn.Linear(context_dim, 2 * context_dim)
        self.proj_out = nn.Linear(context_dim, out_dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """context (B, L, D) -> (B, out_dim)."""
        batch, length, dim = context.shape
        k, v = self.to_kv(context).view(batch, length, 2, self.num_heads, dim // self.num_heads).unbind(2)
        q = self.query.to(k.dtype).view(1, self.num_heads, 1, dim // self.num_heads).expand(batch, -1, -1, -1)
        pooled = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))  # (B, heads, 1, D/heads)
        return self.proj_out(pooled.reshape(batch, dim))


class UNetModel(nn.Module):
    """Text-conditioned U-Net of latent diffusion: ResBlocks with a time embedding, spatial transformers
    with cross-attention to the context at the levels in `attention_resolutions`, skip connections by
    concatenation (Rombach et al., 2022; Ronneberger et al., 2015).

    Defaults are SD 1.x's. Heads are given either as a count per block
    (`num_heads`, SD 1.x: 8) or as a width (`head_dim`, SD 2.x: 64 channels); exactly one must be set.
    `attention_resolutions` lists downsampling factors (1 = full latent resolution), as in SD configs.
    `context_pooling` adds an attention-pooled summary of the context to the time embedding
    (`ContextPooling`); off in the SD presets, whose checkpoints have no such weights.
    `patch_size` p > 1 folds each p x p patch of latent pixels into channels before the first
    convolution and unfolds the output likewise (space-to-depth, as in simple diffusion, Hoogeboom
    et al. 2023): every level runs at 1/p of the latent resolution, so factor 1 in
    `attention_resolutions` means H/p. The SD presets use p = 1.
    `self_conditioning` doubles the input: x_t is concatenated with an x_0 estimate (the network's own
    from an earlier pass, or zeros; Chen et al. 2023, "Analog Bits", Sec. 3.1). Training
    (`LatentDiffusion`) and sampling (`SelfConditioned`) supply it. Off in the SD presets.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        channel_multipliers: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        num_heads: int | None = 8,
        head_dim: int | None = None,
        transformer_depth: int = 1,
        context_dim: int = 768,
        use_linear_in_transformer: bool = False,
        dropout: float = 0.0,
        norm_groups: int = 32,
        gradient_checkpointing: bool = False,
        context_pooling: bool = False,
        patch_size: int = 1,
        self_conditioning: bool = False,
    ) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"UNetModel: patch_size must be >= 1, got {patch_size}")
        if (num_heads is None) == (head_dim is None):
            raise ValueError(
                f"UNetModel: set exactly one of num_heads (SD 1.x) and head_dim (SD 2.x), "
                f"got num_heads={num_heads}, head_dim={head_dim}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.patch_size = patch_size
        self.self_conditioning = self_conditioning
        # latent sides must be multiples of this: the patch folding and each level's 2x downsampling
        self.downsampling_factor = patch_size * 2 ** (len(channel_multipliers) - 1)
        time_embed_dim = 4 * model_channels

        def res_block(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, ch_out, dropout, norm_groups, gradient_checkpointing)

        def transformer(ch: int) -> SpatialTransformer:
            heads = num_heads if num_heads is not None else ch // head_dim
            width = head_dim if head_dim is not None else ch // num_heads
            if heads * width != ch:
                raise ValueError(f"UNetModel: {ch} channels do not split into heads of {width} (num_heads={heads})")
            return SpatialTransformer(
                ch,
                heads,
                width,
                context_dim,
                transformer_depth,
                dropout,
                use_linear_in_transformer,
                norm_groups,
                gradient_checkpointing,
            )

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        pooling_heads = num_heads if num_heads is not None else max(1, context_dim // head_dim)
        self.context_pool = ContextPooling(context_dim, pooling_heads, time_embed_dim) if context_pooling else None

        # Encoder. `skip_channels` records each input block's output width for the decoder's concatenations.
        input_channels = in_channels * (2 if self_conditioning else 1)  # x_t, then the x_0 estimate
        conv_in = nn.Conv2d(input_channels * patch_size**2, model_channels, 3, padding=1)
        self.input_blocks = nn.ModuleList([UNetBlock(conv_in)])
        skip_channels = [model_channels]
        ch, factor = model_channels, 1
        for level, mult in enumerate(channel_multipliers):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if factor in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(UNetBlock(*layers))
                skip_channels.append(ch)
            if level < len(channel_multipliers) - 1:
                self.input_blocks.append(UNetBlock(Downsample(ch)))
                skip_channels.append(ch)
                factor *= 2

        # The middle block always has attention, whatever `attention_resolutions` says (as in SD).
        self.middle_block = UNetBlock(res_block(ch, ch), transformer(ch), res_block(ch, ch))

        # Decoder: one more ResBlock per level than the encoder, to consume the downsampler's skip too.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_multipliers))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if factor in attention_resolutions:
                    layers.append(transformer(ch))
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    factor //= 2
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(
            GroupNorm32(norm_groups, ch), nn.SiLU(), nn.Conv2d(ch, out_channels * patch_size**2, 3, padding=1)
        )
        # Zero-init: the untrained network predicts 0 (the mean of eps), not noise of its own.
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        x0_estimate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, in_channels, H, W) latents; timesteps: (B,) int or float; context: (B, L, context_dim);
        x0_estimate: (B, in_channels, H, W) or None (zeros) when `self_conditioning`, else None.

        Returns (B, out_channels, H, W). H and W should be divisible by patch_size * 2^(levels - 1).
        """
        if self.self_conditioning:
            x = torch.cat([x, torch.zeros_like(x) if x0_estimate is None else x0_estimate.to(x.dtype)], dim=1)
        elif x0_estimate is not None:
            raise ValueError("UNetModel: an x0_estimate was given to a U-Net built without self_conditioning")
        t_emb = timestep_embedding(timesteps, self.model_channels)  # (B, model_channels)
        # Match the weights' dtype so a model cast wholesale to bf16/fp16 runs without autocast.
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))  # (B, 4 * model_channels)
        if self.context_pool is not None:
            emb = emb + self.context_pool(context)
        h = F.pixel_unshuffle(x, self.patch_size) if self.patch_size > 1 else x  # (B, C p^2, H/p, W/p)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)  # (B, C_level, H / 2^level, W / 2^level)
            skips.append(h)
        h = self.middle_block(h, emb, context)  # (B, C_last, H / 2^(levels-1), W / 2^(levels-1))
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)  # (B, C_level, H', W')
        out = self.out(h)  # (B, out_channels p^2, H/p, W/p)
        return F.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out  # (B, out_channels, H, W)
