"""The constructor configs of an SD-shaped model, read from its weights.

An original SD single file carries no config. Its tensors' shapes give every width, level, block
count, where attention sits, the context width and the kind of projection; what no tensor stores
comes from the family's conventions (``FAMILIES``): SD 1.x attends with 8 heads at every level and
reads CLIP ViT-L/14's last layer padded with EOT; SD 2.x attends with 64-channel heads and reads
OpenCLIP ViT-H/14's penultimate layer padded with 0; both VAEs scale latents by 0.18215, and CLIP's
attention heads are 64 channels wide. So SD 1.5, SD 2.1 and SD-shaped files of any width import with
the architecture they have, and the training presets (``configs/model/*.yaml``) are the only place
the published sizes are written down.
"""

from __future__ import annotations

import re
from typing import Any

import open_clip
from torch import Tensor

from ldm.errors import UserError
from ldm.formats.clip_layouts import count_blocks

SD_VAE_SCALING_FACTOR = 0.18215
SD_NORM_GROUPS = 32  # every GroupNorm of SD's U-Net and VAE (a count no tensor stores)
CLIP_HEAD_WIDTH = 64
# what an SD single file does not store, by family: the U-Net's heads, and how the text encoder is read
FAMILIES: dict[str, dict[str, Any]] = {
    "sd1": dict(
        unet=dict(num_heads=8, head_dim=None),
        text_model="ViT-L-14",
        text=dict(quick_gelu=True, layer="last", pad_token_id=49407),
    ),
    "sd2": dict(
        unet=dict(num_heads=None, head_dim=64),
        text_model="ViT-H-14",
        text=dict(quick_gelu=False, layer="penultimate", pad_token_id=0),
    ),
}


def unet_config_from_weights(state: dict[str, Tensor], family: str) -> dict[str, Any]:
    """``UNetModel`` keyword arguments of an SD-layout U-Net state dict (``model.diffusion_model.`` removed)."""
    try:
        model_channels, in_channels = state["input_blocks.0.0.weight"].shape[:2]
        levels = _unet_levels(state)
        context = [v.shape[1] for k, v in state.items() if k.endswith("transformer_blocks.0.attn2.to_k.weight")]
        proj_in = next(v for k, v in state.items() if k.endswith(".proj_in.weight")) if context else None
        depth = 1 + max(
            (int(m[1]) for k in state if (m := re.search(r"input_blocks\.\d+\.1\.transformer_blocks\.(\d+)\.", k))),
            default=0,
        )
        config = dict(
            in_channels=int(in_channels),
            out_channels=int(state["out.2.weight"].shape[0]),
            model_channels=int(model_channels),
            channel_multipliers=tuple(width // int(model_channels) for width, _, _ in levels),
            num_res_blocks=levels[0][1],
            # downsampling factors of the attending levels, coarsest first as SD's configs list them
            attention_resolutions=tuple(
                2**level for level, (_, _, attention) in reversed(list(enumerate(levels))) if attention
            ),
            **FAMILIES[family]["unet"],
            transformer_depth=depth,
            context_dim=int(context[0]) if context else None,
            use_linear_in_transformer=proj_in is not None and proj_in.ndim == 2,
            dropout=0.0,
            norm_groups=SD_NORM_GROUPS,
        )
    except (KeyError, IndexError, StopIteration) as error:
        raise UserError(f"the U-Net's weights are not in the SD layout (no {error})") from None
    if any(n != levels[0][1] for _, n, _ in levels):
        raise UserError(
            f"the U-Net has different block counts per level ({[n for _, n, _ in levels]}): not an SD layout"
        )
    attending = [width for width, _, attention in levels if attention]
    per_head = config["head_dim"] or 0
    if any(width % (per_head or config["num_heads"]) for width in attending):
        heads = f"{per_head}-channel heads" if per_head else f"{config['num_heads']} heads"
        raise UserError(
            f"the U-Net's attention widths {attending} do not split into {family}'s {heads}: the file "
            "is not shaped like its family; convert it from the diffusers folder it came from"
        )
    return config


def _unet_levels(state: dict[str, Tensor]) -> list[tuple[int, int, bool]]:
    """(width, ResBlocks, has attention) of each encoder level, from ``input_blocks.*``: each level's
    ResBlocks, then a Downsample (``op``) before the next level."""
    levels: list[tuple[int, int, bool]] = []
    width, blocks, attention = 0, 0, False
    index = 1
    while any(k.startswith(f"input_blocks.{index}.") for k in state):
        if f"input_blocks.{index}.0.op.weight" in state:
            levels.append((width, blocks, attention))
            blocks, attention = 0, False
        else:
            width = int(state[f"input_blocks.{index}.0.out_layers.3.weight"].shape[0])
            blocks += 1
            attention = attention or f"input_blocks.{index}.1.norm.weight" in state
        index += 1
    levels.append((width, blocks, attention))
    return levels


def vae_config_from_weights(state: dict[str, Tensor]) -> dict[str, Any]:
    """``AutoencoderKL`` keyword arguments of an SD-layout VAE state dict (``first_stage_model.`` removed)."""
    try:
        base = int(state["encoder.conv_in.weight"].shape[0])
        num_levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
        widths = [int(state[f"encoder.down.{level}.block.0.conv2.weight"].shape[0]) for level in range(num_levels)]
        blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
        return dict(
            in_channels=int(state["encoder.conv_in.weight"].shape[1]),
            out_channels=int(state["decoder.conv_out.weight"].shape[0]),
            base_channels=base,
            channel_multipliers=tuple(width // base for width in widths),
            num_res_blocks=blocks,
            attention_resolutions=(),  # SD's VAE attends in its middle block only
            resolution=256,
            z_channels=int(state["encoder.conv_out.weight"].shape[0]) // 2,
            embed_dim=int(state["quant_conv.weight"].shape[0]) // 2,
            scaling_factor=SD_VAE_SCALING_FACTOR,
            norm_groups=SD_NORM_GROUPS,
        )
    except (KeyError, ValueError) as error:
        raise UserError(f"the VAE's weights are not in the SD layout ({error})") from None


def text_config_from_weights(tower: dict[str, Tensor], family: str) -> dict[str, Any]:
    """``OpenCLIPTextEncoder`` keyword arguments of an open_clip-layout text tower: the family's named
    open_clip config when the tower has its sizes (SD 1.x's ViT-L/14, SD 2.x's ViT-H/14), else an
    explicit ``text_cfg`` of the sizes found, with 64-channel heads."""
    try:
        vocab_size, width = (int(n) for n in tower["token_embedding.weight"].shape)
        text_cfg = dict(
            context_length=int(tower["positional_embedding"].shape[0]),
            vocab_size=vocab_size,
            width=width,
            heads=max(1, width // CLIP_HEAD_WIDTH),
            layers=count_blocks(tower),
            mlp_ratio=tower["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        )
    except (KeyError, ValueError) as error:
        raise UserError(f"the text encoder's weights are not a CLIP text tower ({error})") from None
    conventions = FAMILIES[family]
    named = open_clip.get_model_config(conventions["text_model"])["text_cfg"]
    # SD 2.x files may hold one block fewer than ViT-H-14 (diffusers' never-run last block left out)
    layers_fit = (
        text_cfg["layers"] in (named["layers"], named["layers"] - 1)
        if family == "sd2"
        else (text_cfg["layers"] == named["layers"])
    )
    sizes_fit = all(text_cfg[k] == named[k] for k in ("width", "heads", "context_length", "vocab_size"))
    if layers_fit and sizes_fit and text_cfg["mlp_ratio"] == named.get("mlp_ratio", 4.0):
        return dict(model_name=conventions["text_model"], **conventions["text"])
    return dict(model_name=None, text_cfg=text_cfg, **conventions["text"])
