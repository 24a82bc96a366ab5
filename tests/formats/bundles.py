"""Tiny random models in the SD 1.x and SD 2.x structures, as bundles (shared by the format tests)."""

from typing import Any

import torch

from ldm.formats.bundle import ModelBundle, bundle_from_modules, sd_schedule
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.conditioners import OpenCLIPTextEncoder
from ldm.models.unet import UNetModel

TEXT_CFG = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=3)
UNET_SD1 = dict(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_multipliers=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2, 1),
    num_heads=2,
    head_dim=None,
    context_dim=32,
    use_linear_in_transformer=False,
)
UNET_SD2 = dict(UNET_SD1, num_heads=None, head_dim=16, use_linear_in_transformer=True)
VAE = dict(
    base_channels=32,
    channel_multipliers=(1, 2),
    num_res_blocks=1,
    resolution=32,
    z_channels=4,
    embed_dim=4,
    scaling_factor=0.5,
)
TEXT_SD1 = dict(model_name=None, text_cfg=TEXT_CFG, quick_gelu=True, layer="last", pad_token_id=49407)
TEXT_SD2 = dict(model_name=None, text_cfg=TEXT_CFG, quick_gelu=False, layer="penultimate", pad_token_id=0)


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values everywhere (zero-initialised convs and unit norms would hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return module.eval()


def make_bundle(flavour: str, seed: int = 0, **custom_unet_options: Any) -> ModelBundle:
    """An SD-shaped bundle; U-Net options beyond SD's (context_pooling, patch_size, ...) make it a custom model."""
    unet_config, text_config = (UNET_SD1, TEXT_SD1) if flavour == "sd1" else (UNET_SD2, TEXT_SD2)
    custom = bool(custom_unet_options)  # not an SD layout: a custom model that our metadata describes
    if custom:
        unet_config = dict(unet_config, **custom_unet_options)
    unet = randomise(UNetModel(**unet_config), seed)
    vae = randomise(AutoencoderKL(**VAE), seed + 1)
    text = randomise(OpenCLIPTextEncoder(**text_config), seed + 2)
    return bundle_from_modules(
        unet,
        vae,
        text,
        dict(unet_config=unet_config, vae_config=VAE, text_config=text_config),
        family="custom" if custom else flavour,
        prediction_type="eps" if flavour == "sd1" else "v",
        image_size=32,
        schedule=sd_schedule(zero_terminal_snr=flavour == "sd2"),
    )


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
