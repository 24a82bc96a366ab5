"""Parameter names and configs in both directions between our models (= original Stable Diffusion
single-file names) and the diffusers folder layout (`unet/`, `vae/`: `UNet2DConditionModel`,
`AutoencoderKL`), for any size our constructors build.

The maps only rename (and, for the VAE's attention, view 1x1-conv weights as Linear weights), so a
round trip returns the very same tensors. What goes where (ours -> diffusers; l = level, r = block):

    U-Net
    time_embed.0 / .2                      -> time_embedding.linear_1 / .linear_2
    input_blocks.0.0                       -> conv_in
    input_blocks.{k}.0 / .1                -> down_blocks.{l}.resnets.{r} / .attentions.{r}
    input_blocks.{k}.0.op                  -> down_blocks.{l}.downsamplers.0.conv
    middle_block.0 / .1 / .2               -> mid_block.resnets.0 / .attentions.0 / .resnets.1
    output_blocks.{k}.0 / .1               -> up_blocks.{u}.resnets.{r} / .attentions.{r}  (u = 0: lowest res.)
    output_blocks.{k}.{1 or 2}.conv        -> up_blocks.{u}.upsamplers.0.conv
    out.0 / out.2                          -> conv_norm_out / conv_out
    ResBlock in_layers.0, in_layers.2, emb_layers.1, out_layers.0, out_layers.3, skip_connection
                                           -> norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut

    VAE
    encoder.down.{l}.block.{r} / .attn.{r} -> encoder.down_blocks.{l}.resnets.{r} / .attentions.{r}
    encoder.down.{l}.downsample.conv       -> encoder.down_blocks.{l}.downsamplers.0.conv
    decoder.up.{l}.*                       -> decoder.up_blocks.{L-1-l}.*  (reversed), upsample -> upsamplers.0
    {en,de}coder.mid.block_1 / attn_1 / block_2 -> mid_block.resnets.0 / attentions.0 / resnets.1
    {en,de}coder.norm_out                  -> conv_norm_out;  nin_shortcut -> conv_shortcut
    attention norm, q, k, v, proj_out      -> group_norm, to_q, to_k, to_v, to_out.0  ((C, C, 1, 1) -> (C, C))

Transformer internals (norm, proj_in, transformer_blocks.*, proj_out) keep their names; SD 1.x's 1x1-conv
proj_in/proj_out stay convs in diffusers (`use_linear_projection=False`), SD 2.x's are Linear on both sides.

Quirk kept on purpose: diffusers' `attention_head_dim` holds the number of *heads* (diffusers issue
#2011): SD 1.x writes one count (8), SD 2.x one count per level ([5, 10, 20, 20] for 64-wide heads).
"""

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.unet import UNetModel

# The diffusers release whose config format `*_diffusers_config` was checked against; diffusers itself
# only records this field, it does not read it.
DIFFUSERS_VERSION = "0.42.1"

# Config keys that describe parts our U-Net does not have or fixes one way, with the one value our
# U-Net implies (each equals diffusers' default). Written out on export; an import rejects other values.
_UNET_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,  # our timestep embedding is cat([cos, sin])
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,  # diffusers refuses it; heads travel in attention_head_dim
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}

# diffusers' defaults for the keys we read, used where a config.json leaves them out (old SD 1.x files
# have no `use_linear_projection`); tests check them against diffusers' signature.
_UNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "use_linear_projection": False,
}

# As `_UNET_FIXED`, for the VAE. Latent shift/statistics would change what the latents mean, so an import
# refuses them rather than drop them; `force_upcast` is only an inference precision hint and is ignored.
_VAE_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

_VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}

# Sub-module names inside one residual block / VAE attention block, ours -> diffusers.
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTENTION_PROJECTIONS = ("q", "k", "v", "proj_out")  # 1x1 convs for us, Linear in diffusers


@dataclass(frozen=True)
class ModuleMap:
    """Module paths of one model in one naming -> the other naming; a parameter keeps its own name.

    `reshaped` lists source-side modules whose `weight` changes shape on the way (the VAE attention's
    1x1 convs <-> Linear), and `reshape` does it.
    """

    names: dict[str, str]
    reshaped: frozenset[str] = frozenset()
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None

    def apply(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename every key of `state`; raises KeyError listing keys no module path covers."""
        out, unmatched = {}, []
        for key, tensor in state.items():
            module = _owning_module(key, self.names)
            if module is None:
                unmatched.append(key)
                continue
            if module in self.reshaped and key == f"{module}.weight":
                tensor = self.reshape(tensor)
            out[self.names[module] + key[len(module) :]] = tensor
        if unmatched:
            raise KeyError(f"{len(unmatched)} keys have no counterpart for this config, e.g. {unmatched[:5]}")
        return out

    def inverse(self, reshape: Callable[[torch.Tensor], torch.Tensor] | None = None) -> "ModuleMap":
        """The map the other way; `reshape` undoes this map's reshape."""
        names = {theirs: ours for ours, theirs in self.names.items()}
        assert len(names) == len(self.names), "module map is not one-to-one"
        return ModuleMap(names, frozenset(self.names[m] for m in self.reshaped), reshape)


def _owning_module(key: str, names: Mapping[str, str]) -> str | None:
    """The longest dotted prefix of `key` that `names` maps (matching whole components only)."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:end])
        if module in names:
            return module
    return None


def _add(names: dict[str, str], ours: str, theirs: str, inner: Mapping[str, str] | None = None) -> None:
    # With `inner`, map each listed sub-module (a renamed block); without, the whole subtree as is.
    if inner is None:
        names[ours] = theirs
    else:
        names.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in inner.items()})


def _with_defaults(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` completed with the defaults of `cls`'s constructor; Hydra's `_target_`-style keys dropped."""
    parameters = inspect.signature(cls).parameters
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(config) - set(parameters))
    if unknown:
        raise ValueError(f"{cls.__name__} has no arguments {unknown}")
    return {name: config.get(name, p.default) for name, p in parameters.items()}


# ----------------------------------------------------------------------------------------------- U-Net


def _unet_levels(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[int], list[bool]]:
    """Full kwargs, the width of each level, and whether each level has attention (factor 2**level)."""
    kw = _with_defaults(UNetModel, config)
    mults = tuple(kw["channel_multipliers"])
    if mults[0] != 1:
        # diffusers' conv_in, time embedding and conv_out all use block_out_channels[0]; ours use model_channels.
        raise ValueError(f"diffusers layout needs channel_multipliers[0] == 1, got {mults}")
    widths = [kw["model_channels"] * m for m in mults]
    attention = [2**level in tuple(kw["attention_resolutions"]) for level in range(len(mults))]
    return kw, widths, attention


def unet_module_map(config: Mapping[str, Any]) -> ModuleMap:
    """Module paths of `UNetModel(**config)` -> those of the same `UNet2DConditionModel`."""
    kw, widths, attention = _unet_levels(config)
    levels, blocks = len(widths), kw["num_res_blocks"]
    names = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    k = 1  # input_blocks.0 is conv_in; then `blocks` entries per level and one per downsampler
    for level in range(levels):
        for r in range(blocks):
            _add(names, f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{r}", _UNET_RESNET)
            if attention[level]:
                _add(names, f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{r}")
            k += 1
        if level < levels - 1:
            _add(names, f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            k += 1
    _add(names, "middle_block.0", "mid_block.resnets.0", _UNET_RESNET)
    _add(names, "middle_block.1", "mid_block.attentions.0")
    _add(names, "middle_block.2", "mid_block.resnets.1", _UNET_RESNET)
    # diffusers numbers up blocks in execution order (lowest resolution first), as our output_blocks run.
    for up, level in enumerate(reversed(range(levels))):
        for r in range(blocks + 1):
            k = up * (blocks + 1) + r
            _add(names, f"output_blocks.{k}.0", f"up_blocks.{up}.resnets.{r}", _UNET_RESNET)
            if attention[level]:
                _add(names, f"output_blocks.{k}.1", f"up_blocks.{up}.attentions.{r}")
            if level > 0 and r == blocks:
                _add(names, f"output_blocks.{k}.{1 + attention[level]}.conv", f"up_blocks.{up}.upsamplers.0.conv")
    return ModuleMap(names)


def unet_to_diffusers(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our U-Net state dict (no `model.diffusion_model.` prefix) -> `UNet2DConditionModel` names.

    `config`: our `UNetModel` kwargs. Tensors are passed through, not copied. KeyError on unmapped keys.
    """
    return unet_module_map(config).apply(state)


def unet_from_diffusers(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A `UNet2DConditionModel` state dict -> ours (loads into `UNetModel(**config)` with strict=True)."""
    return unet_module_map(config).inverse().apply(state)


def unet_diffusers_config(config: Mapping[str, Any], sample_size: int) -> dict[str, Any]:
    """The `unet/config.json` of a `UNet2DConditionModel` with the architecture of `UNetModel(**config)`.

    `sample_size`: the latent side the model is meant for (64 for SD 1.5, 96 for SD 2.x-768); diffusers'
    pipelines use it for the default image size only.
    """
    kw, widths, attention = _unet_levels(config)
    if kw["num_heads"] is not None:
        heads: int | list[int] = kw["num_heads"]  # SD 1.x: the same head count at every level
    else:
        heads = [width // kw["head_dim"] for width in widths]  # SD 2.x: fixed head width, count per level
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,
        "in_channels": kw["in_channels"],
        "out_channels": kw["out_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": widths,
        "layers_per_block": kw["num_res_blocks"],
        "transformer_layers_per_block": kw["transformer_depth"],
        "cross_attention_dim": kw["context_dim"],
        "attention_head_dim": heads,
        "use_linear_projection": kw["use_linear_in_transformer"],
        "norm_num_groups": kw["norm_groups"],
        "dropout": kw["dropout"],
        **_UNET_FIXED,
    }


def unet_config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`UNetModel` kwargs for a `UNet2DConditionModel` config (a folder's `unet/config.json`).

    Raises ValueError for architectures `UNetModel` cannot build (class or additional embeddings,
    mismatched up/down blocks, per-level widths that are not multiples of the first, ...).
    """
    _check_fixed(cfg, _UNET_FIXED, "UNet2DConditionModel")
    cfg = {**_UNET_DEFAULTS, **cfg}
    widths = [int(w) for w in cfg["block_out_channels"]]
    attention = _unet_attention_from_types(cfg["down_block_types"], cfg["up_block_types"])
    if len(attention) != len(widths):
        raise ValueError(f"{len(attention)} block types for {len(widths)} block_out_channels")
    num_heads, head_dim = _heads_from_diffusers(cfg["attention_head_dim"], widths, attention)
    return {
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "model_channels": widths[0],
        "channel_multipliers": _multipliers(widths),
        "num_res_blocks": _uniform(cfg["layers_per_block"], "layers_per_block"),
        "attention_resolutions": tuple(2**level for level in reversed(range(len(widths))) if attention[level]),
        "num_heads": num_heads,
        "head_dim": head_dim,
        "transformer_depth": _uniform(cfg["transformer_layers_per_block"], "transformer_layers_per_block"),
        "context_dim": _uniform(cfg["cross_attention_dim"], "cross_attention_dim"),
        "use_linear_in_transformer": bool(cfg["use_linear_projection"]),
        "dropout": cfg["dropout"],
        "norm_groups": cfg["norm_num_groups"],
    }


def _unet_attention_from_types(down_types: list[str], up_types: list[str]) -> list[bool]:
    """Per level, whether it has cross-attention; our U-Net needs the up path to mirror the down path."""
    known = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(t not in known for t in down_types):
        raise ValueError(f"UNetModel builds only CrossAttnDownBlock2D / DownBlock2D, got {list(down_types)}")
    attention = [known[t] for t in down_types]
    mirrored = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if list(up_types) != mirrored:
        raise ValueError(f"UNetModel needs up_block_types {mirrored} for these down blocks, got {list(up_types)}")
    return attention


def _heads_from_diffusers(
    attention_head_dim: int | list[int], widths: list[int], attention: list[bool]
) -> tuple[int | None, int | None]:
    """(num_heads, head_dim) from diffusers' per-level head counts; exactly one is set.

    One count everywhere is SD 1.x's `num_heads`; a list whose counts give one head width at every level
    with attention (the middle block included) is SD 2.x's `head_dim`.
    """
    if isinstance(attention_head_dim, int):
        return attention_head_dim, None
    heads = [int(h) for h in attention_head_dim]
    used = [level for level in range(len(widths)) if attention[level]] + [len(widths) - 1]
    if len(heads) != len(widths) or any(widths[i] % heads[i] for i in used):
        raise ValueError(f"attention_head_dim {heads} does not split block_out_channels {widths} into heads")
    head_widths = {widths[i] // heads[i] for i in used}
    if len(head_widths) == 1:
        return None, head_widths.pop()
    if len({heads[i] for i in used}) == 1:
        return heads[used[0]], None
    raise ValueError(f"UNetModel needs one head count or one head width at every level, got heads {heads}")


# ------------------------------------------------------------------------------------------------- VAE


def _vae_levels(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[int], list[bool]]:
    """Full kwargs, the width of each level, and whether each level has attention (by resolution)."""
    kw = _with_defaults(AutoencoderKL, config)
    if kw["z_channels"] != kw["embed_dim"]:
        # diffusers has one `latent_channels` for both the encoder's output and quant_conv's.
        raise ValueError(f"diffusers layout needs z_channels == embed_dim, got {kw['z_channels']}, {kw['embed_dim']}")
    widths = [kw["base_channels"] * m for m in kw["channel_multipliers"]]
    attention = [kw["resolution"] // 2**i in tuple(kw["attention_resolutions"]) for i in range(len(widths))]
    return kw, widths, attention


def _add_vae_level(
    names: dict[str, str], reshaped: set[str], ours: str, theirs: str, blocks: int, attention: bool
) -> None:
    for j in range(blocks):
        _add(names, f"{ours}.block.{j}", f"{theirs}.resnets.{j}", _VAE_RESNET)
        if attention:
            _add_vae_attention(names, reshaped, f"{ours}.attn.{j}", f"{theirs}.attentions.{j}")


def _add_vae_attention(names: dict[str, str], reshaped: set[str], ours: str, theirs: str) -> None:
    _add(names, ours, theirs, _VAE_ATTENTION)
    reshaped.update(f"{ours}.{p}" for p in _VAE_ATTENTION_PROJECTIONS)


def vae_module_map(config: Mapping[str, Any]) -> ModuleMap:
    """Module paths of `AutoencoderKL(**config)` (ours) -> those of diffusers' `AutoencoderKL`."""
    kw, widths, attention = _vae_levels(config)
    levels, blocks = len(widths), kw["num_res_blocks"]
    names = {
        m: m
        for m in (
            "quant_conv",
            "post_quant_conv",
            "encoder.conv_in",
            "encoder.conv_out",
            "decoder.conv_in",
            "decoder.conv_out",
        )
    }
    reshaped: set[str] = set()
    for half in ("encoder", "decoder"):
        names[f"{half}.norm_out"] = f"{half}.conv_norm_out"
        _add(names, f"{half}.mid.block_1", f"{half}.mid_block.resnets.0", _VAE_RESNET)
        _add_vae_attention(names, reshaped, f"{half}.mid.attn_1", f"{half}.mid_block.attentions.0")
        _add(names, f"{half}.mid.block_2", f"{half}.mid_block.resnets.1", _VAE_RESNET)
    for i in range(levels):
        down = f"encoder.down_blocks.{i}"
        _add_vae_level(names, reshaped, f"encoder.down.{i}", down, blocks, attention[i])
        if i < levels - 1:
            names[f"encoder.down.{i}.downsample.conv"] = f"{down}.downsamplers.0.conv"
        # Our decoder lists levels by resolution (up.0 = full, run last); diffusers in execution order.
        up = f"decoder.up_blocks.{levels - 1 - i}"
        _add_vae_level(names, reshaped, f"decoder.up.{i}", up, blocks + 1, attention[i])
        if i > 0:
            names[f"decoder.up.{i}.upsample.conv"] = f"{up}.upsamplers.0.conv"
    return ModuleMap(names, frozenset(reshaped), _conv1x1_to_linear)


def _conv1x1_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 1, 1) -> (C_out, C_in), a view of the same storage."""
    return weight.flatten(1)


def _linear_to_conv1x1(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in) -> (C_out, C_in, 1, 1), a view of the same storage."""
    return weight.reshape(weight.shape[0], -1, 1, 1)


def vae_to_diffusers(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our VAE state dict (no `first_stage_model.` prefix) -> diffusers `AutoencoderKL` names.

    `config`: our `AutoencoderKL` kwargs. Attention q/k/v/proj_out weights become (C, C) views.
    """
    return vae_module_map(config).apply(state)


def vae_from_diffusers(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers `AutoencoderKL` state dict -> ours (loads into `AutoencoderKL(**config)`, strict=True)."""
    return vae_module_map(config).inverse(_linear_to_conv1x1).apply(state)


def vae_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `vae/config.json` of a diffusers `AutoencoderKL` with the architecture of ours(**config)."""
    kw, widths, attention = _vae_levels(config)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": kw["in_channels"],
        "out_channels": kw["out_channels"],
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attention],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attention)],
        "block_out_channels": widths,
        "layers_per_block": kw["num_res_blocks"],
        "latent_channels": kw["z_channels"],
        "norm_num_groups": kw["norm_groups"],
        "sample_size": kw["resolution"],
        "scaling_factor": kw["scaling_factor"],
        **_VAE_FIXED,
    }


def vae_config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Our `AutoencoderKL` kwargs for a diffusers `AutoencoderKL` config (a folder's `vae/config.json`).

    `dropout` is not stored by diffusers and is left to our default.
    """
    _check_fixed(cfg, _VAE_FIXED, "AutoencoderKL")
    cfg = {**_VAE_DEFAULTS, **cfg}
    widths = [int(w) for w in cfg["block_out_channels"]]
    attention = _vae_attention_from_types(cfg["down_block_types"], cfg["up_block_types"])
    if len(attention) != len(widths):
        raise ValueError(f"{len(attention)} block types for {len(widths)} block_out_channels")
    resolution = _uniform(cfg["sample_size"], "sample_size")
    return {
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "base_channels": widths[0],
        "channel_multipliers": _multipliers(widths),
        "num_res_blocks": cfg["layers_per_block"],
        "attention_resolutions": tuple(resolution // 2**i for i in range(len(widths)) if attention[i]),
        "resolution": resolution,
        "z_channels": cfg["latent_channels"],
        "embed_dim": cfg["latent_channels"],
        "scaling_factor": cfg["scaling_factor"],
        "norm_groups": cfg["norm_num_groups"],
    }


def _vae_attention_from_types(down_types: list[str], up_types: list[str]) -> list[bool]:
    """Per level, whether it has self-attention; the decoder must mirror the encoder, as ours does."""
    known = {"AttnDownEncoderBlock2D": True, "DownEncoderBlock2D": False}
    if any(t not in known for t in down_types):
        raise ValueError(f"AutoencoderKL builds only (Attn)DownEncoderBlock2D, got {list(down_types)}")
    attention = [known[t] for t in down_types]
    mirrored = ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attention)]
    if list(up_types) != mirrored:
        raise ValueError(f"AutoencoderKL needs up_block_types {mirrored} for these down blocks, got {list(up_types)}")
    return attention


# ------------------------------------------------------------------------------------------ shared


def _check_fixed(cfg: Mapping[str, Any], fixed: Mapping[str, Any], cls: str) -> None:
    """Raise if `cfg` sets a key of `fixed` to a value our model cannot build."""
    bad = {k: cfg[k] for k, v in fixed.items() if k in cfg and cfg[k] != v}
    if bad:
        raise ValueError(f"{cls} config has options our model does not implement: {bad}")


def _multipliers(widths: list[int]) -> tuple[int, ...]:
    """Channel multipliers of the first width, which must divide every other."""
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first")
    return tuple(w // widths[0] for w in widths)


def _uniform(value: int | list[int], name: str) -> int:
    """An int, or a per-level list of one repeated int; our models take one value for all levels."""
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ValueError(f"our models take one {name} for all levels, got {list(value)}")
    return int(value[0])
