"""AutoencoderKL: numerical parity with diffusers through its own SD single-file converter, and contracts."""

import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL, DiagonalGaussian

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_vae_checkpoint,
    create_vae_diffusers_config_from_ldm,
)

PREFIX = "first_stage_model."
# Reduced width, SD's structure otherwise: 4 levels (8x downsampling), 2 residual blocks per level.
SMALL = dict(base_channels=32, channel_multipliers=(1, 2, 2, 2), num_res_blocks=2, z_channels=4, embed_dim=4)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter (GroupNorm starts at 1/0, which would hide a swapped scale and shift)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _ldm_config(kwargs: dict) -> dict:
    """The slice of an original LDM yaml that diffusers' converter reads."""
    ddconfig = dict(
        double_z=True,
        z_channels=kwargs["z_channels"],
        resolution=256,
        in_channels=3,
        out_ch=3,
        ch=kwargs["base_channels"],
        ch_mult=list(kwargs["channel_multipliers"]),
        num_res_blocks=kwargs["num_res_blocks"],
        attn_resolutions=[],
        dropout=0.0,
    )
    return {"model": {"params": {"first_stage_config": {"params": {"embed_dim": 4, "ddconfig": ddconfig}}}}}


def _to_diffusers(ours: AutoencoderKL, kwargs: dict) -> tuple[dict, dict]:
    """Our state dict, prefixed as in an SD checkpoint, through diffusers' converter -> (config, state dict)."""
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    config = create_vae_diffusers_config_from_ldm(_ldm_config(kwargs), checkpoint, scaling_factor=ours.scaling_factor)
    return config, convert_ldm_vae_checkpoint(checkpoint, config)


@pytest.fixture(scope="module")
def pair() -> tuple[AutoencoderKL, "diffusers.AutoencoderKL", dict]:
    ours = _randomise(AutoencoderKL(**SMALL), seed=0)
    config, converted = _to_diffusers(ours, SMALL)
    reference = diffusers.AutoencoderKL(**config, norm_num_groups=32).eval()
    reference.load_state_dict(converted, strict=True)
    return ours, reference, converted


def test_parity_with_diffusers(pair):
    ours, reference, _ = pair
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        posterior = ours.encode(x)
        ref_posterior = reference.encode(x).latent_dist
        z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
        decoded, ref_decoded = ours.decode(z), reference.decode(z).sample
    assert (posterior.mean - ref_posterior.mean).abs().max() < 1e-4
    assert (posterior.logvar - ref_posterior.logvar).abs().max() < 1e-4
    assert decoded.shape == (2, 3, 32, 32)
    assert (decoded - ref_decoded).abs().max() < 1e-4


def test_diffusers_weights_load_back_strictly(pair):
    """A diffusers state dict mapped back to SD names loads with strict=True and gives diffusers' outputs."""
    ours, reference, converted = pair
    # Invert the converter's key map: it only renames (and views 1x1 conv weights as linear), so each
    # converted tensor still points at the storage of the SD-named tensor it came from.
    source = {v.data_ptr(): k for k, v in ours.state_dict().items()}
    to_ldm = {key: source[v.data_ptr()] for key, v in converted.items()}
    assert len(set(to_ldm.values())) == len(ours.state_dict())

    fresh_reference = _randomise(diffusers.AutoencoderKL(**reference.config), seed=3)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    back = {to_ldm[k]: v.reshape(shapes[to_ldm[k]]) for k, v in fresh_reference.state_dict().items()}
    reloaded = AutoencoderKL(**SMALL).eval()
    reloaded.load_state_dict(back, strict=True)

    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (reloaded.encode(x).mean - fresh_reference.encode(x).latent_dist.mean).abs().max() < 1e-4
        z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(5))
        assert (reloaded.decode(z) - fresh_reference.decode(z).sample).abs().max() < 1e-4


def test_default_is_the_stable_diffusion_vae():
    with torch.device("meta"):
        sd = AutoencoderKL()
    assert sum(p.numel() for p in sd.parameters()) == 83_653_863
    assert len(sd.state_dict()) == 248
    assert sd.downsampling_factor == 8 and sd.latent_channels == 4 and sd.scaling_factor == 0.18215


@pytest.mark.parametrize("multipliers, size, latent_size", [((1, 2, 2), 64, 16), ((1, 2, 2, 2), 256, 32)])
def test_latent_shapes(multipliers, size, latent_size):
    # On the meta device only shapes are computed, so 256x256 costs nothing.
    with torch.device("meta"):
        vae = AutoencoderKL(base_channels=32, channel_multipliers=multipliers, num_res_blocks=1).eval()
        z = vae.encode_to_latent(torch.empty(1, 3, size, size))
        image = vae.decode_from_latent(z)
    assert vae.downsampling_factor == size // latent_size
    assert z.shape == (1, 4, latent_size, latent_size)
    assert image.shape == (1, 3, size, size)


def test_round_trip_runs_on_real_tensors():
    vae = AutoencoderKL(base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1).eval()
    with torch.no_grad():
        reconstruction, posterior = vae(torch.rand(2, 3, 8, 8) * 2 - 1)
    assert reconstruction.shape == (2, 3, 8, 8) and posterior.mean.shape == (2, 4, 4, 4)
    assert torch.isfinite(reconstruction).all()


def test_attention_is_placed_by_resolution():
    vae = AutoencoderKL(base_channels=32, channel_multipliers=(1, 2, 2), resolution=64, attention_resolutions=(16,))
    names = {k.rsplit(".attn.", 1)[0] for k in vae.state_dict() if ".attn." in k}
    assert names == {"encoder.down.2", "decoder.up.2"}
    assert len(vae.decoder.up[2].attn) == 3  # one per block, num_res_blocks + 1 in the decoder


def test_widths_must_fit_group_norm():
    with pytest.raises(ValueError, match="multiple of 32"):
        AutoencoderKL(base_channels=16)


def test_kl_of_standard_normal_posterior_is_zero():
    assert torch.equal(DiagonalGaussian(torch.zeros(3, 8, 2, 2)).kl(), torch.zeros(3))


def test_kl_matches_closed_form():
    params = torch.randn(2, 8, 3, 3)
    posterior = DiagonalGaussian(params)
    q = torch.distributions.Normal(posterior.mean, posterior.std)
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), expected)


def test_sample_is_reproducible_with_a_seeded_generator():
    posterior = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    a = posterior.sample(torch.Generator().manual_seed(7))
    b = posterior.sample(torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, posterior.sample(torch.Generator().manual_seed(8)))
    assert torch.equal(posterior.mode(), posterior.mean)


def test_logvar_is_clamped():
    posterior = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), -100.0)], dim=1))
    assert posterior.logvar.item() == -30.0


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    vae = AutoencoderKL(base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1, attention_resolutions=(8,))
    vae.train()
    x = torch.randn(2, 3, 8, 8)

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        vae.zero_grad()
        vae.gradient_checkpointing = checkpointing
        assert vae.encoder.gradient_checkpointing is vae.decoder.gradient_checkpointing is checkpointing
        reconstruction, posterior = vae(x, sample_posterior=False)
        (reconstruction.square().mean() + posterior.kl().mean()).backward()
        return [p.grad.clone() for p in vae.parameters()]

    for plain, checkpointed in zip(grads(False), grads(True)):
        torch.testing.assert_close(plain, checkpointed)
