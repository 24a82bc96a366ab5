"""Our diffusers key maps and configs: the same keys and tensors as diffusers' own single-file converters,
strict loading and equal outputs in diffusers' classes, bit-exact round trips both ways, config round
trips, the published SD 1.5 / 2.1 configs, and the full-size maps (built on the meta device)."""

import ast
import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.presets import network_configs
from ldm.formats import diffusers_layout
from ldm.formats.diffusers_layout import (
    unet_config_from_diffusers,
    unet_diffusers_config,
    unet_from_diffusers,
    unet_to_diffusers,
    vae_config_from_diffusers,
    vae_diffusers_config,
    vae_from_diffusers,
    vae_to_diffusers,
)
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.unet import UNetModel

# SD's structure (four levels, attention at factors 4/2/1, two ResBlocks per level) at a tenth of its width.
SD_SHAPED = dict(
    model_channels=32,
    channel_multipliers=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(4, 2, 1),
    context_dim=64,
)
UNETS = {
    "sd1": dict(SD_SHAPED, num_heads=8, head_dim=None, use_linear_in_transformer=False),
    "sd2": dict(SD_SHAPED, num_heads=None, head_dim=16, use_linear_in_transformer=True),
    # The toy's mix (head count with linear projections), a level without attention, one ResBlock per level.
    "toy": dict(
        model_channels=32,
        channel_multipliers=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(2, 4),
        num_heads=4,
        head_dim=None,
        context_dim=64,
        use_linear_in_transformer=True,
    ),
}
VAES = {
    "sd": dict(base_channels=32, channel_multipliers=(1, 2, 2, 2), num_res_blocks=2),
    # Attention inside a level (SD's VAE has none; diffusers' converter does not map these keys).
    "level_attention": dict(
        base_channels=32,
        channel_multipliers=(1, 2),
        num_res_blocks=1,
        resolution=32,
        attention_resolutions=(16,),
        norm_groups=16,
    ),
}

# The architecture keys of the published `unet/config.json` / `vae/config.json` of SD 1.5 and SD 2.1.
SD15_UNET_JSON = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_UNET_JSON = dict(
    SD15_UNET_JSON,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    sample_size=96,
    use_linear_projection=True,
    upcast_attention=True,
    dual_cross_attention=False,
    num_class_embeds=None,
    only_cross_attention=False,
)
SD_VAE_JSON = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def _diffusers() -> Any:
    return pytest.importorskip("diffusers")


def _architecture(cls: type, config: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    """`config` completed with `cls`'s defaults, sequences as tuples, without the keys in `drop`.

    Attention resolutions are a set to the models; the importers list them in SD's order (descending).
    """
    params = inspect.signature(cls).parameters
    full = {name: config.get(name, p.default) for name, p in params.items() if name not in drop}
    full["attention_resolutions"] = sorted(full["attention_resolutions"], reverse=True)
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in full.items()}


def _unet_architecture(config: dict[str, Any]) -> dict[str, Any]:
    not_in_diffusers = ("gradient_checkpointing", "context_pooling", "patch_size", "self_conditioning")
    return _architecture(UNetModel, config, drop=not_in_diffusers)


def _vae_architecture(config: dict[str, Any]) -> dict[str, Any]:
    # diffusers' VAE config has no dropout: it comes back as our default.
    return _architecture(AutoencoderKL, config, drop=("gradient_checkpointing", "dropout"))


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (zero-initialised output layers included), of unit-preserving scale."""
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
    return model.eval()


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in state.items()}


def _unet_inputs(batch: int = 2, size: int = 16) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size, size, generator=generator)
    context = torch.randn(batch, 7, 64, generator=generator)
    return x, torch.tensor([3, 999]), context


def _unet_original_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The `model.params` of an SD inference yaml for a U-Net built from `kwargs` (what the converter reads)."""
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


def _vae_original_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The slice of an LDM yaml that diffusers' VAE converter reads."""
    ddconfig = dict(
        double_z=True,
        z_channels=4,
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


@pytest.fixture(scope="module", params=sorted(UNETS))
def unet(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], UNetModel]:
    torch.manual_seed(0)
    return request.param, UNETS[request.param], _randomise(UNetModel(**UNETS[request.param]))


@pytest.fixture(scope="module", params=sorted(VAES))
def vae(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], AutoencoderKL]:
    torch.manual_seed(0)
    return request.param, VAES[request.param], _randomise(AutoencoderKL(**VAES[request.param]))


# ----------------------------------------------------------------------------- (1) diffusers' converters


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_unet_map_equals_diffusers_converter(flavour: str) -> None:
    """Key by key, our map gives what `convert_ldm_unet_checkpoint` gives; so does the config for the keys
    the converter sets (the SD 1.x head count vs SD 2.x per-level head counts included)."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    kwargs = UNETS[flavour]
    state = _randomise(UNetModel(**kwargs)).state_dict()
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    reference_config = single_file_utils.create_unet_diffusers_config_from_ldm(
        _unet_original_config(kwargs), checkpoint
    )
    reference = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, reference_config)
    _assert_same_tensors(unet_to_diffusers(state, kwargs), reference)

    ours = unet_diffusers_config(kwargs, sample_size=reference_config["sample_size"])
    for key, value in reference_config.items():
        if key in ours:
            assert ours[key] == (list(value) if isinstance(value, tuple) else value), key
    assert ours["attention_head_dim"] == (8 if flavour == "sd1" else [2, 4, 4, 4])  # heads, not widths


def test_vae_map_equals_diffusers_converter() -> None:
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    kwargs = VAES["sd"]
    state = _randomise(AutoencoderKL(**kwargs)).state_dict()
    checkpoint = {f"first_stage_model.{k}": v for k, v in state.items()}
    reference_config = single_file_utils.create_vae_diffusers_config_from_ldm(
        _vae_original_config(kwargs), checkpoint, scaling_factor=0.18215
    )
    reference = single_file_utils.convert_ldm_vae_checkpoint(checkpoint, reference_config)
    mapped = vae_to_diffusers(state, kwargs)
    _assert_same_tensors(mapped, reference)
    # The one reshape: the VAE attention's 1x1 convs are Linear layers in diffusers.
    assert state["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert mapped["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    ours = vae_diffusers_config(dict(kwargs, resolution=reference_config["sample_size"]))
    assert all(ours[key] == value for key, value in reference_config.items()), (ours, reference_config)


# ------------------------------------------------------------------ (2) strict load, same outputs


def test_unet_loads_strictly_in_diffusers_and_agrees(unet: tuple[str, dict[str, Any], UNetModel]) -> None:
    diffusers = _diffusers()
    flavour, kwargs, ours = unet
    reference = diffusers.UNet2DConditionModel(**unet_diffusers_config(kwargs, sample_size=16)).eval()
    reference.load_state_dict(unet_to_diffusers(ours.state_dict(), kwargs), strict=True)
    # proj_in/proj_out: 1x1 convs for SD 1.x in both layouts, Linear for SD 2.x in both; nothing reshaped.
    proj_in = reference.down_blocks[-2].attentions[0].proj_in
    assert isinstance(proj_in, torch.nn.Linear if kwargs["use_linear_in_transformer"] else torch.nn.Conv2d)

    x, timesteps, context = _unet_inputs()
    with torch.no_grad():
        out = ours(x, timesteps, context)
        expected = reference(x, timesteps, encoder_hidden_states=context).sample
    assert out.abs().mean() > 0.1  # a real signal, not two near-zero tensors
    assert (out - expected).abs().max().item() < 1e-4


def test_vae_loads_strictly_in_diffusers_and_agrees(vae: tuple[str, dict[str, Any], AutoencoderKL]) -> None:
    diffusers = _diffusers()
    flavour, kwargs, ours = vae
    reference = diffusers.AutoencoderKL(**vae_diffusers_config(kwargs)).eval()
    reference.load_state_dict(vae_to_diffusers(ours.state_dict(), kwargs), strict=True)

    factor = ours.downsampling_factor
    x = torch.randn(2, 3, 4 * factor, 4 * factor, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        posterior, ref_posterior = ours.encode(x), reference.encode(x).latent_dist
        decoded, ref_decoded = ours.decode(z), reference.decode(z).sample
    assert (posterior.mean - ref_posterior.mean).abs().max() < 1e-4
    assert (posterior.logvar - ref_posterior.logvar).abs().max() < 1e-4
    assert decoded.abs().mean() > 0.1 and (decoded - ref_decoded).abs().max() < 1e-4


def test_diffusers_weights_load_strictly_into_ours() -> None:
    """The other direction on diffusers' own (random) weights: our U-Net and VAE give diffusers' outputs."""
    diffusers = _diffusers()
    kwargs = UNETS["sd2"]
    torch.manual_seed(0)
    reference = _randomise(diffusers.UNet2DConditionModel(**unet_diffusers_config(kwargs, 16)), seed=3)
    ours = UNetModel(**kwargs).eval()
    ours.load_state_dict(unet_from_diffusers(reference.state_dict(), kwargs), strict=True)
    x, timesteps, context = _unet_inputs()
    with torch.no_grad():
        out, expected = ours(x, timesteps, context), reference(x, timesteps, encoder_hidden_states=context).sample
    assert (out - expected).abs().max().item() < 1e-4

    kwargs = VAES["level_attention"]
    reference_vae = _randomise(diffusers.AutoencoderKL(**vae_diffusers_config(kwargs)), seed=4)
    ours_vae = AutoencoderKL(**kwargs).eval()
    ours_vae.load_state_dict(vae_from_diffusers(reference_vae.state_dict(), kwargs), strict=True)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ours_vae.encode(x).mean - reference_vae.encode(x).latent_dist.mean).abs().max() < 1e-4
        assert (ours_vae(x, sample_posterior=False)[0] - reference_vae(x).sample).abs().max() < 1e-4


# ------------------------------------------------------------------------------- (3) round trips


def test_unet_round_trips_are_bit_identical(unet: tuple[str, dict[str, Any], UNetModel]) -> None:
    _, kwargs, ours = unet
    state = ours.state_dict()
    mapped = unet_to_diffusers(state, kwargs)
    assert len(mapped) == len(state)
    _assert_same_tensors(unet_from_diffusers(mapped, kwargs), state)
    _assert_same_tensors(unet_to_diffusers(unet_from_diffusers(mapped, kwargs), kwargs), mapped)


def test_vae_round_trips_are_bit_identical(vae: tuple[str, dict[str, Any], AutoencoderKL]) -> None:
    _, kwargs, ours = vae
    state = ours.state_dict()
    mapped = vae_to_diffusers(state, kwargs)
    assert len(mapped) == len(state)
    _assert_same_tensors(vae_from_diffusers(mapped, kwargs), state)
    _assert_same_tensors(vae_to_diffusers(vae_from_diffusers(mapped, kwargs), kwargs), mapped)


def test_keys_outside_the_config_are_refused() -> None:
    """A state dict from another architecture fails loudly instead of being half renamed."""
    state = UNetModel(**UNETS["toy"]).state_dict()
    with pytest.raises(KeyError, match="no counterpart"):
        unet_to_diffusers(state, UNETS["sd1"])  # one ResBlock per level where the config says two
    with pytest.raises(KeyError, match="no counterpart"):
        vae_from_diffusers({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, VAES["sd"])


# --------------------------------------------------------------------------------- (4) configs


@pytest.mark.parametrize("name", [*sorted(UNETS), "sd15", "sd21"])
def test_unet_config_round_trips(name: str) -> None:
    config = (
        network_configs({"sd15": "sd15", "sd21": "sd21_base"}[name])["unet"]
        if name in ("sd15", "sd21")
        else UNETS[name]
    )
    config = dict(config, dropout=0.1, norm_groups=16, transformer_depth=2) if name == "sd1" else config
    assert unet_config_from_diffusers(unet_diffusers_config(config, 64)) == _unet_architecture(config)


@pytest.mark.parametrize("name", [*sorted(VAES), "default"])
def test_vae_config_round_trips(name: str) -> None:
    config = VAES.get(name, {})
    assert vae_config_from_diffusers(vae_diffusers_config(config)) == _vae_architecture(config)


def test_published_sd_configs_import_as_our_presets() -> None:
    """The quirk: SD 1.5's attention_head_dim 8 is a head count (num_heads); SD 2.1's [5, 10, 20, 20]
    are per-level head counts of 64-wide heads (head_dim)."""
    assert unet_config_from_diffusers(SD15_UNET_JSON) == _unet_architecture(network_configs("sd15")["unet"])
    assert unet_config_from_diffusers(SD21_UNET_JSON) == _unet_architecture(network_configs("sd21_base")["unet"])
    assert vae_config_from_diffusers(SD_VAE_JSON) == _vae_architecture(dict(resolution=512))
    exported = unet_diffusers_config(network_configs("sd21_768")["unet"], sample_size=96)
    assert all(exported[k] == v for k, v in SD21_UNET_JSON.items() if not k.startswith("_") and k != "upcast_attention")


def test_config_defaults_are_diffusers_defaults() -> None:
    """What we assume for keys a config.json leaves out is what diffusers assumes."""
    diffusers = _diffusers()
    for cls, defaults, fixed in [
        (diffusers.UNet2DConditionModel, diffusers_layout._UNET_DEFAULTS, diffusers_layout._UNET_FIXED),
        (diffusers.AutoencoderKL, diffusers_layout._VAE_DEFAULTS, diffusers_layout._VAE_FIXED),
    ]:
        params = inspect.signature(cls.__init__).parameters
        for key, value in {**defaults, **fixed}.items():
            assert params[key].default == value, (cls.__name__, key)


def test_unsupported_diffusers_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="does not implement"):
        unet_config_from_diffusers(dict(SD15_UNET_JSON, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="up_block_types"):
        unet_config_from_diffusers(dict(SD15_UNET_JSON, up_block_types=["UpBlock2D"] * 4))
    with pytest.raises(ValueError, match="one head count or one head width"):
        unet_config_from_diffusers(dict(SD21_UNET_JSON, attention_head_dim=[5, 10, 20, 10]))
    with pytest.raises(ValueError, match="does not implement"):
        vae_config_from_diffusers(dict(SD_VAE_JSON, shift_factor=0.1159))
    with pytest.raises(ValueError, match="z_channels == embed_dim"):
        vae_diffusers_config(dict(z_channels=4, embed_dim=3))
    with pytest.raises(ValueError, match=r"channel_multipliers\[0\] == 1"):
        unet_diffusers_config(dict(network_configs("sd15")["unet"], channel_multipliers=(2, 4)), 64)


# ------------------------------------------------------------------------- (5) full-size maps


@pytest.mark.parametrize("preset", ["sd15", "sd21_base"])
def test_full_size_unet_maps_one_to_one(preset: str) -> None:
    diffusers = _diffusers()
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = network_configs(preset)["unet"]
    with torch.device("meta"):
        state = UNetModel(**config).state_dict()
        reference = diffusers.UNet2DConditionModel(**unet_diffusers_config(config, sample_size=64)).state_dict()
    mapped = unet_to_diffusers(state, config)
    assert len(state) == len(mapped) == len(reference) == 686
    assert _shapes(mapped) == _shapes(reference)
    assert _shapes(unet_from_diffusers(mapped, config)) == _shapes(state)
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    assert set(convert_ldm_unet_checkpoint(checkpoint, {"layers_per_block": 2})) == set(mapped)


def test_full_size_vae_maps_one_to_one() -> None:
    diffusers = _diffusers()
    with torch.device("meta"):
        state = AutoencoderKL().state_dict()
        reference = diffusers.AutoencoderKL(**vae_diffusers_config({})).state_dict()
    mapped = vae_to_diffusers(state, {})
    assert len(state) == len(mapped) == len(reference) == 248
    assert _shapes(mapped) == _shapes(reference)
    assert _shapes(vae_from_diffusers(mapped, {})) == _shapes(state)


def test_module_does_not_import_diffusers() -> None:
    """diffusers is a test-only reference: the package must work without it."""
    tree = ast.parse(Path(diffusers_layout.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [m for m in imported if m.split(".")[0] == "diffusers"]
