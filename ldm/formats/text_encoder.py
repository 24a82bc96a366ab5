"""The text encoder's weights in files: finding the CLIP text tower in a checkpoint of any layout,
loading it into an ``OpenCLIPTextEncoder``, and the Hugging Face layout diffusers folders hold.

``OpenCLIPTextEncoder`` (``ldm.models``) is the network only; every file and layout concern is here.
``open_clip_text_encoder`` is what the model configs build (``model.conditioner.pretrained=FILE``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import open_clip
from open_clip.transformer import QuickGELU
from torch import Tensor

from ldm.checkpoints import load_state_dict_file, resolve_path
from ldm.errors import UserError
from ldm.formats.clip_layouts import find_text_encoder, hf_text_config, hf_to_open_clip, open_clip_to_hf
from ldm.models.conditioners import OpenCLIPTextEncoder


def open_clip_text_encoder(pretrained: str | None = None, **arguments: Any) -> OpenCLIPTextEncoder:
    """``OpenCLIPTextEncoder(**arguments)`` with the weights of ``pretrained`` loaded: a local weights
    file holding the text encoder in any layout ``load_text_weights`` knows (an open_clip model or text
    tower, an SD 1.x or 2.x checkpoint, an HF/diffusers CLIPTextModel), or an open_clip pretrained tag
    already in open_clip's local cache (named in your own config: a checkpoint never names one).
    None keeps the seeded random init, which is how the toy and the tests run offline."""
    encoder = OpenCLIPTextEncoder(**arguments)
    if pretrained is not None:
        load_text_weights(encoder, _read_pretrained(pretrained, arguments.get("model_name")))
    return encoder


def _read_pretrained(pretrained: str, model_name: str | None) -> Mapping[str, Tensor]:
    path = resolve_path(pretrained)
    if path.exists():
        return load_state_dict_file(path)
    if model_name is None:
        raise UserError(f"text encoder weights not found: {pretrained}")
    try:
        return open_clip.create_model(model_name, pretrained=pretrained, device="cpu").state_dict()
    except Exception as error:  # open_clip raises RuntimeError/OSError/HF errors alike
        raise UserError(
            f"text encoder weights {pretrained!r} are neither a local file nor a cached open_clip tag "
            f"for {model_name} ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        ) from None


def load_text_weights(encoder: OpenCLIPTextEncoder, state: Mapping[str, Tensor]) -> None:
    """Load the one text encoder found in ``state``, in either layout and under any prefix.

    open_clip layout: open_clip files (the image tower is skipped), SD 2.x checkpoints
    (``cond_stage_model.model.*``); HF layout: SD 1.x checkpoints
    (``cond_stage_model.transformer.text_model.*``), transformers and diffusers files.
    """
    layout, tower_state = find_text_encoder(state)
    encoder.load_tower(hf_to_open_clip(tower_state) if layout == "hf" else tower_state)


def load_text_weights_hf(encoder: OpenCLIPTextEncoder, text_model_state: Mapping[str, Tensor]) -> None:
    """Load HF CLIPTextModel weights (names relative to ``text_model.``).

    The HF model may hold fewer layers than the tower, as long as it holds every block the encoder
    runs: diffusers' 23-layer SD 2.x text encoder loads into ``ViT-H-14`` with ``layer="penultimate"``
    (block 24 keeps its seeded init and is never run) or into a 23-block tower with ``layer="last"``;
    both reproduce the HF ``last_hidden_state``.
    """
    encoder.load_tower(hf_to_open_clip(text_model_state))


def text_state_hf(encoder: OpenCLIPTextEncoder) -> dict[str, Tensor]:
    """The blocks the encoder runs as HF CLIPTextModel tensors (names relative to ``text_model.``).

    A ``CLIPTextModel(CLIPTextConfig(**text_config_hf(encoder)))`` holding them returns the encoder's
    hidden states as ``last_hidden_state`` (for SD 2.x: the diffusers layout, 23 layers).
    """
    return open_clip_to_hf(encoder.model.state_dict(), num_layers=encoder.num_blocks)


def text_config_hf(encoder: OpenCLIPTextEncoder) -> dict[str, Any]:
    """``CLIPTextConfig`` keyword arguments matching ``text_state_hf(encoder)``."""
    block = encoder.model.transformer.resblocks[0]
    return hf_text_config(
        encoder.model.state_dict(),
        heads=block.attn.num_heads,
        quick_gelu=isinstance(block.mlp.gelu, QuickGELU),
        num_layers=encoder.num_blocks,
        layer_norm_eps=encoder.model.ln_final.eps,
    )
