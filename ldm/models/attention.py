"""Attention blocks of the latent-diffusion U-Net: cross-attention, GEGLU feed-forward, transformer block
and the spatial transformer that runs them over a feature map.

Parameter names follow the original Stable Diffusion layout (`ldm/modules/attention.py` in CompVis and
Stability-AI/stablediffusion), so SD 1.x / 2.x weights load with strict=True.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout of a (B, C, H, W) tensor: channels_last when it is stored so, else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (SD's `GroupNorm32`).

    Mean and variance over thousands of bf16/fp16 values lose too much precision; the result is cast
    back to the input dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Weights are upcast too, so a model cast wholesale to bf16 still works without autocast.
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention from `query_dim` tokens to `context_dim` tokens (Vaswani et al., 2017).

    With `context=None` the queries attend to themselves (self-attention); then `context_dim` must
    equal `query_dim`, which is the default.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        num_heads: int = 8,
        head_dim: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = num_heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)  # (B, heads, N, head_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, query_dim); context: (B, L, context_dim) or None. Returns (B, N, query_dim)."""
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))  # (B, heads, N, head_dim)
        k = self._split_heads(self.to_k(context))  # (B, heads, L, head_dim)
        v = self._split_heads(self.to_v(context))  # (B, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        out = out.transpose(1, 2).flatten(2)  # (B, N, heads * head_dim)
        return self.to_out(out)  # (B, N, query_dim)


class GEGLU(nn.Module):
    """Linear projection gated by a GELU of its second half (Shazeer, 2020, "GLU Variants")."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim_in) -> (..., dim_out)."""
        x, gate = self.proj(x).chunk(2, dim=-1)  # (..., dim_out) each
        return x * F.gelu(gate)  # (..., dim_out)


class FeedForward(nn.Module):
    """Transformer MLP with a GEGLU input layer and a 4x wider hidden layer, as in SD."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = mult * dim
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim)."""
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the context, feed-forward."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, context_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, num_heads, head_dim, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, num_heads, head_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, N, dim); context: (B, L, context_dim). Returns (B, N, dim)."""
        x = x + self.attn1(self.norm1(x))  # (B, N, dim)
        x = x + self.attn2(self.norm2(x), context)  # (B, N, dim)
        x = x + self.ff(self.norm3(x))  # (B, N, dim)
        return x


class SpatialTransformer(nn.Module):
    """Transformer blocks over the pixels of a feature map, with a residual around them (Rombach et al.,
    2022, Sec. 3.3).

    `use_linear=False` projects in and out with 1x1 convolutions (SD 1.x); `use_linear=True` with
    Linear layers on the flattened tokens (SD 2.x). The output projection starts at zero, so a new
    block is the identity.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        head_dim: int,
        context_dim: int,
        depth: int = 1,
        dropout: float = 0.0,
        use_linear: bool = False,
        norm_groups: int = 32,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = num_heads * head_dim
        self.use_linear = use_linear
        self.gradient_checkpointing = gradient_checkpointing
        # eps=1e-6 here, unlike the ResBlocks' 1e-5: SD's `Normalize` in attention.py.
        self.norm = GroupNorm32(norm_groups, channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, num_heads, head_dim, context_dim, dropout) for _ in range(depth)
        )
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); context: (B, L, context_dim). Returns (B, C, H, W)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        h_ = self.norm(x)  # (B, C, H, W)
        if self.use_linear:
            h_ = self.proj_in(h_.flatten(2).transpose(1, 2))  # (B, H*W, inner)
        else:
            # contiguous tokens: the residual adds in the blocks keep their first operand's layout,
            # and a transposed one would make every LayerNorm copy (~1% of an SD 1.x step on CPUs)
            h_ = self.proj_in(h_).flatten(2).transpose(1, 2).contiguous()  # (B, H*W, inner)
        for block in self.transformer_blocks:
            h_ = block(h_, context)  # (B, H*W, inner)
        layout = _memory_format(x)
        if self.use_linear:
            h_ = self.proj_out(h_).transpose(1, 2).reshape(b, c, h, w).contiguous(memory_format=layout)
        else:
            h_ = self.proj_out(h_.transpose(1, 2).reshape(b, -1, h, w).contiguous(memory_format=layout))
        return x + h_  # (B, C, H, W)
