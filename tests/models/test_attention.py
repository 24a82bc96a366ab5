"""Contracts of the attention blocks: the math of attention, SD parameter names, identity at init."""

import math

import pytest
import torch

from ldm.models.attention import BasicTransformerBlock, CrossAttention, GroupNorm32, SpatialTransformer


def _naive_attention(attn: CrossAttention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, written out (Vaswani et al., 2017, Eq. 1)."""
    b, n, _ = x.shape
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    heads = attn.num_heads
    q, k, v = (t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return attn.to_out((weights @ v).transpose(1, 2).reshape(b, n, -1))


def test_cross_attention_matches_the_written_out_formula() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=32, context_dim=48, num_heads=4, head_dim=8)
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 48)
    out = attn(x, context)
    assert out.shape == (2, 10, 32)
    torch.testing.assert_close(out, _naive_attention(attn, x, context), atol=1e-5, rtol=1e-5)


def test_cross_attention_without_context_is_self_attention() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=32, num_heads=2, head_dim=16)
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(attn(x), attn(x, x))


def test_transformer_block_parameter_names_follow_sd() -> None:
    names = set(BasicTransformerBlock(dim=32, num_heads=4, head_dim=8, context_dim=48).state_dict())
    expected = {
        "attn1.to_q.weight",
        "attn1.to_k.weight",
        "attn1.to_v.weight",
        "attn1.to_out.0.weight",
        "attn1.to_out.0.bias",
        "ff.net.0.proj.weight",
        "ff.net.0.proj.bias",
        "ff.net.2.weight",
        "ff.net.2.bias",
        "norm1.weight",
        "norm1.bias",
        "norm2.weight",
        "norm2.bias",
        "norm3.weight",
        "norm3.bias",
    }
    expected |= {name.replace("attn1", "attn2") for name in expected if name.startswith("attn1")}
    assert names == expected
    block = BasicTransformerBlock(dim=32, num_heads=4, head_dim=8, context_dim=48)
    assert block.attn2.to_k.weight.shape == (32, 48)
    assert block.ff.net[0].proj.weight.shape == (2 * 4 * 32, 32)


@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer_is_identity_at_init(use_linear: bool) -> None:
    torch.manual_seed(0)
    st = SpatialTransformer(64, num_heads=2, head_dim=32, context_dim=16, use_linear=use_linear)
    x = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(st(x, torch.randn(2, 5, 16)), x)


def test_conv_and_linear_projections_compute_the_same_function() -> None:
    """SD 1.x (1x1 conv) and SD 2.x (Linear) flavours differ only in the shape of the projection weights."""
    torch.manual_seed(0)
    conv = SpatialTransformer(64, num_heads=2, head_dim=32, context_dim=16, use_linear=False)
    torch.nn.init.normal_(conv.proj_out.weight, std=0.1)
    linear = SpatialTransformer(64, num_heads=2, head_dim=32, context_dim=16, use_linear=True)
    state = {k: v.flatten(1) if k.startswith("proj_") and v.ndim == 4 else v for k, v in conv.state_dict().items()}
    linear.load_state_dict(state)
    x, context = torch.randn(2, 64, 4, 4), torch.randn(2, 5, 16)
    torch.testing.assert_close(linear(x, context), conv(x, context), atol=1e-5, rtol=1e-5)


def test_group_norm32_runs_in_float32_for_bf16_inputs() -> None:
    torch.manual_seed(0)
    norm = GroupNorm32(4, 16)
    x = torch.randn(2, 16, 8, 8) * 3 + 5
    out = norm.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    reference = torch.nn.functional.group_norm(x.to(torch.bfloat16).float(), 4, eps=norm.eps)
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=0)
