"""Contracts of the U-Net: shapes, the timestep embedding, zero output at init, gradient checkpointing,
the SD presets' sizes, and numerical parity with diffusers after diffusers' own single-file conversion."""

import math
from typing import Any

import pytest
import torch

from bench.presets import network_configs
from ldm.models.unet import UNetModel, timestep_embedding

TINY = dict(
    model_channels=32,
    channel_multipliers=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(1, 2),
    num_heads=4,
    context_dim=64,
)

# SD's structure (four levels, attention at factors 4/2/1, two ResBlocks per level) at a fifth of its width.
SD_SHAPED = dict(
    model_channels=64,
    channel_multipliers=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(4, 2, 1),
    context_dim=64,
    norm_groups=32,
)
FLAVOURS = {
    "sd1": dict(SD_SHAPED, num_heads=8, head_dim=None, use_linear_in_transformer=False),
    "sd2": dict(SD_SHAPED, num_heads=None, head_dim=32, use_linear_in_transformer=True),
}


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero weights everywhere (the zero-initialised output layers included), of unit-preserving scale."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def _inputs(model: UNetModel, batch: int = 2, size: int = 16, context_dim: int = 64) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, model.input_blocks[0][0].in_channels, size, size, generator=generator)
    timesteps = torch.tensor([3, 999] * (batch // 2) + [500] * (batch % 2))
    context = torch.randn(batch, 7, context_dim, generator=generator)
    return x, timesteps, context


@pytest.mark.parametrize("flavour", [dict(), dict(num_heads=None, head_dim=16, use_linear_in_transformer=True)])
def test_output_has_the_input_shape(flavour: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = UNetModel(**dict(TINY, **flavour), out_channels=6)
    x, timesteps, context = _inputs(model)
    assert model(x, timesteps, context).shape == (2, 6, 16, 16)
    assert model(x, timesteps.float() + 0.5, context).shape == (2, 6, 16, 16)


def test_timestep_embedding_matches_the_closed_form() -> None:
    t = torch.tensor([0, 1, 250, 999])
    dim, half = 32, 16
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim)
    for row, step in zip(emb, t.tolist()):
        for i in range(half):
            angle = step * math.exp(-math.log(10000.0) * i / half)
            assert row[i].item() == pytest.approx(math.cos(angle), abs=1e-5)
            assert row[half + i].item() == pytest.approx(math.sin(angle), abs=1e-5)
    odd = timestep_embedding(t, dim + 1)
    torch.testing.assert_close(odd[:, :dim], emb)
    assert torch.all(odd[:, dim] == 0)


def test_output_is_zero_at_init() -> None:
    torch.manual_seed(0)
    model = UNetModel(**TINY)
    assert torch.all(model(*_inputs(model)) == 0)


def test_gradient_checkpointing_gives_identical_gradients() -> None:
    torch.manual_seed(0)
    plain = UNetModel(**TINY)
    _randomise(plain)
    checkpointed = UNetModel(**TINY, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, timesteps, context = _inputs(plain)
    for model in (plain, checkpointed):
        model(x, timesteps, context).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name


def test_heads_must_be_given_exactly_one_way() -> None:
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        UNetModel(**dict(TINY, head_dim=16))
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        UNetModel(**dict(TINY, num_heads=None))


@pytest.mark.parametrize(("preset", "num_params"), [("sd15", 859_520_964), ("sd21_base", 865_910_724)])
def test_presets_have_the_published_sizes(preset: str, num_params: int) -> None:
    with torch.device("meta"):
        model = UNetModel(**network_configs(preset)["unet"])
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert len(model.state_dict()) == 686  # U-Net keys under model.diffusion_model. in SD 1.x / 2.x checkpoints


def _original_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The `model.params` part of an SD inference yaml that describes a U-Net built from `kwargs`."""
    unet = dict(
        in_channels=4,
        out_channels=4,
        model_channels=kwargs["model_channels"],
        channel_mult=list(kwargs["channel_multipliers"]),
        num_res_blocks=kwargs["num_res_blocks"],
        attention_resolutions=list(kwargs["attention_resolutions"]),
        transformer_depth=1,
        context_dim=kwargs["context_dim"],
        use_linear_in_transformer=kwargs["use_linear_in_transformer"],
    )
    if kwargs["num_heads"] is not None:
        unet["num_heads"] = kwargs["num_heads"]
    else:
        unet["num_head_channels"] = kwargs["head_dim"]
    vae = {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}
    return {"model": {"params": {"unet_config": {"params": unet}, "first_stage_config": {"params": vae}}}}


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_matches_diffusers_after_single_file_conversion(flavour: str) -> None:
    """Our names are SD's: diffusers' converter maps every one of them, and the converted U-Net agrees."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    from diffusers import UNet2DConditionModel

    kwargs = FLAVOURS[flavour]
    torch.manual_seed(0)
    ours = UNetModel(**kwargs).eval()
    _randomise(ours)
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}

    config = single_file_utils.create_unet_diffusers_config_from_ldm(_original_config(kwargs), checkpoint)
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, config)
    # Every tensor of ours lands under exactly one diffusers name: nothing silently dropped or duplicated.
    assert len(converted) == len(checkpoint)
    assert {id(v) for v in converted.values()} == {id(v) for v in checkpoint.values()}
    reference = UNet2DConditionModel(**config).eval()
    reference.load_state_dict(converted, strict=True)

    x, timesteps, context = _inputs(ours)
    with torch.no_grad():
        out = ours(x, timesteps, context)
        expected = reference(x, timesteps, encoder_hidden_states=context).sample
    assert out.abs().mean() > 0.1  # a real signal, not two near-zero tensors
    assert (out - expected).abs().max().item() < 1e-4


def test_context_pooling_starts_as_the_plain_unet_and_then_conditions_every_resblock() -> None:
    torch.manual_seed(0)
    plain, pooled = UNetModel(**TINY), UNetModel(**TINY, context_pooling=True)
    _randomise(plain)
    pooled.load_state_dict(plain.state_dict(), strict=False)  # all but context_pool.*, which keeps its init
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    context = torch.randn(2, 7, 64)
    assert torch.equal(pooled(x, t, context), plain(x, t, context))  # zero-initialised output projection

    with torch.no_grad():
        pooled.context_pool.proj_out.weight.normal_()
    emb = pooled.time_embed(timestep_embedding(t, 32))
    query, (k, v) = pooled.context_pool.query, pooled.context_pool.to_kv(context).chunk(2, dim=-1)
    heads, width = 4, 16  # num_heads of TINY; one head at a time, by hand
    summary = torch.cat(
        [
            torch.softmax(k[..., h * width : (h + 1) * width] @ query[h * width : (h + 1) * width] / width**0.5, dim=-1)
            .unsqueeze(1)
            .bmm(v[..., h * width : (h + 1) * width])
            .squeeze(1)
            for h in range(heads)
        ],
        dim=-1,
    )
    expected = emb + pooled.context_pool.proj_out(summary)
    torch.testing.assert_close(pooled.context_pool(context) + emb, expected)
    assert not torch.allclose(pooled(x, t, context), plain(x, t, context))


def test_patched_unet_is_the_plain_unet_on_folded_latents() -> None:
    """patch_size=2 = pixel_unshuffle -> a U-Net with 4x the channels at half the size -> pixel_shuffle."""
    torch.manual_seed(0)
    patched = UNetModel(in_channels=4, out_channels=4, patch_size=2, **TINY).eval()
    plain = UNetModel(in_channels=16, out_channels=16, **TINY).eval()
    _randomise(patched)
    assert [(k, v.shape) for k, v in patched.state_dict().items()] == [
        (k, v.shape) for k, v in plain.state_dict().items()
    ]  # the same names: only conv_in and the output conv are wider
    plain.load_state_dict(patched.state_dict())
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    timesteps, context = torch.tensor([3, 999]), torch.randn(2, 7, 64)
    with torch.no_grad():
        out = patched(x, timesteps, context)
        reference = torch.nn.functional.pixel_shuffle(
            plain(torch.nn.functional.pixel_unshuffle(x, 2), timesteps, context), 2
        )
    assert out.shape == x.shape
    assert torch.equal(out, reference)
    # the fold is the 2x2 patch: latent pixel (y, x), channel c lands at channel 4c + 2(y%2) + x%2 of (y//2, x//2)
    folded = torch.nn.functional.pixel_unshuffle(x, 2)
    assert torch.equal(folded[:, 4 * 1 + 2 * 1 + 0, 3, 5], x[:, 1, 7, 10])


def test_patch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        UNetModel(patch_size=0, **TINY)


def test_self_conditioning_reads_the_estimate_through_the_second_half_of_conv_in() -> None:
    torch.manual_seed(0)
    plain, self_conditioned = UNetModel(**TINY).eval(), UNetModel(**TINY, self_conditioning=True).eval()
    _randomise(plain)
    assert self_conditioned.input_blocks[0][0].in_channels == 8 and self_conditioned.in_channels == 4
    state = plain.state_dict()
    conv_in = state["input_blocks.0.0.weight"]  # (C, 4, 3, 3)
    estimate_weight = torch.randn_like(conv_in) / 6
    self_conditioned.load_state_dict({**state, "input_blocks.0.0.weight": torch.cat([conv_in, estimate_weight], 1)})
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 7, 64)
    estimate = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(self_conditioned(x, t, context), self_conditioned(x, t, context, torch.zeros_like(x)))
        torch.testing.assert_close(self_conditioned(x, t, context), plain(x, t, context))  # zeros: the plain U-Net
        # conv_in is linear: the estimate's half adds its own convolution to the first activations
        with_estimate = self_conditioned.input_blocks[0][0](torch.cat([x, estimate], 1))
        torch.testing.assert_close(
            with_estimate,
            plain.input_blocks[0][0](x) + torch.nn.functional.conv2d(estimate, estimate_weight, padding=1),
        )
        assert not torch.allclose(self_conditioned(x, t, context, estimate), plain(x, t, context))


def test_an_estimate_for_a_unet_without_self_conditioning_is_an_error() -> None:
    model = UNetModel(**TINY)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 7, 64)
    with pytest.raises(ValueError, match="self_conditioning"):
        model(x, t, context, x0_estimate=x)
