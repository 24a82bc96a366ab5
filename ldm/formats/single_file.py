"""The original Stable Diffusion single-file checkpoint (``.safetensors`` or ``.ckpt``).

Layout: ``model.diffusion_model.*`` (U-Net), ``first_stage_model.*`` (VAE), and the text encoder as
``cond_stage_model.transformer.text_model.*`` (SD 1.x: Hugging Face CLIP layout) or
``cond_stage_model.model.*`` (SD 2.x: open_clip layout). Files written here also carry the
bundle's configs in the safetensors metadata (``ldm_bundle``), so any size round-trips exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ldm.checkpoints import load_state_dict_file, save_safetensors
from ldm.errors import UserError
from ldm.formats.architecture import text_config_from_weights, unet_config_from_weights, vae_config_from_weights
from ldm.formats.bundle import ModelBundle, sd_schedule
from ldm.formats.clip_layouts import count_blocks, find_text_encoder, hf_to_open_clip, open_clip_to_hf

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."
METADATA_KEY = "ldm_bundle"


def is_single_file(state_keys) -> bool:
    return any(k.startswith(UNET_PREFIX) for k in state_keys)


def detect_family(state: dict[str, Tensor]) -> str:
    """``sd1`` or ``sd2`` from the keys and shapes, or a one-line error naming what was found."""
    keys = state.keys()
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise UserError("this is an SDXL checkpoint; only SD 1.x and 2.x single files are supported")
    if not is_single_file(keys):
        sample = ", ".join(sorted(keys)[:3])
        raise UserError(f"not a Stable Diffusion checkpoint: no '{UNET_PREFIX}*' keys (found {sample}, ...)")
    # SD 1.x holds OpenAI CLIP in the HF layout, SD 2.x OpenCLIP in open_clip's; the U-Net reads its width
    context = next((v for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), None)
    context_dim = None if context is None else context.shape[1]
    for family, prefix, width_key in (
        ("sd1", SD1_TEXT_PREFIX, "embeddings.token_embedding.weight"),
        ("sd2", SD2_TEXT_PREFIX, "token_embedding.weight"),
    ):
        token_embedding = state.get(prefix + width_key)
        if token_embedding is not None and token_embedding.shape[1] == context_dim:
            return family
    raise UserError(
        f"unrecognised Stable Diffusion variant (cross-attention context {context_dim}, no text encoder of that "
        "width): expected SD 1.x (CLIP under cond_stage_model.transformer.text_model.) or SD 2.x (OpenCLIP under "
        "cond_stage_model.model.)"
    )


def _take(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def read_single_file(path: str | Path) -> tuple[dict[str, Tensor], dict | None]:
    """(tensors, our bundle metadata if the file carries it) of an SD single file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    stored = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get(METADATA_KEY)
        state = load_state_dict_file(path)
    else:
        try:  # mmap: the tensors are read as they are used, not all at once
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # unpicklable code, corrupt file: name the file, not the opcode
            raise UserError(f"{path} is not a loadable weights file ({type(error).__name__})") from error
        stored = checkpoint.get(METADATA_KEY) if isinstance(checkpoint, dict) else None
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise UserError(f"{path} does not hold a state dict")
    return state, json.loads(stored) if stored else None


def import_single_file(
    path: str | Path, prediction_type: str | None = None, image_size: int | None = None
) -> ModelBundle:
    """Read an SD 1.x / 2.x single file (or one we wrote, of any size) into a ``ModelBundle``.

    SD 2.x's 512-base (eps) and 768 (v) models have identical weights' shapes: pass
    ``prediction_type="v"`` and ``image_size=768`` for the 768-v model.
    """
    state, metadata = read_single_file(path)
    family = detect_family(state) if metadata is None else metadata["family"]
    unet, vae = _take(state, UNET_PREFIX), _take(state, VAE_PREFIX)
    layout, text = find_text_encoder(_take(state, "cond_stage_model."))
    text = hf_to_open_clip(text) if layout == "hf" else text
    if metadata is not None:
        bundle = ModelBundle.from_metadata(metadata, unet, vae, text)
    else:
        bundle = ModelBundle(
            unet_config=unet_config_from_weights(unet, family),
            vae_config=vae_config_from_weights(vae),
            text_config=text_config_from_weights(text, family),
            unet=unet,
            vae=vae,
            text=text,
            family=family,
            prediction_type="eps",
            image_size=512,
            schedule=sd_schedule(),
        )
    if prediction_type is not None:
        bundle.prediction_type = prediction_type
    if image_size is not None:
        bundle.image_size = image_size
    return bundle


def export_single_file(bundle: ModelBundle, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``bundle`` in the SD single-file layout as safetensors (atomically).

    ``dtype`` (e.g. torch.float16) casts floating-point tensors; the default keeps them as they are.
    Our configs travel in the metadata, so a model of any size reads back as it was.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"export writes .safetensors files, got {path.name}")
    save_safetensors(single_file_state(bundle, dtype), path, metadata={METADATA_KEY: json.dumps(bundle.metadata())})
    return path


def single_file_state(bundle: ModelBundle, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The tensors of ``bundle`` under SD single-file names.

    The text encoder goes in the HF layout for SD 1.x and in open_clip's otherwise (SD 2.x, custom),
    as diffusers' ``convert_ldm_clip_checkpoint`` / ``convert_open_clip_checkpoint`` and the UIs expect.
    """
    state: dict[str, Tensor] = {}
    state.update({UNET_PREFIX + k: v for k, v in bundle.unet.items()})
    state.update({VAE_PREFIX + k: v for k, v in bundle.vae.items()})
    if bundle.family == "sd1":
        state.update({SD1_TEXT_PREFIX + k: v for k, v in sd1_text_state(bundle.text).items()})
    else:
        state.update({SD2_TEXT_PREFIX + k: v for k, v in bundle.text.items() if k != "attn_mask"})
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def sd1_text_state(text: dict[str, Tensor]) -> dict[str, Tensor]:
    """An open_clip text tower as SD 1.x files hold it: HF CLIPTextModel names, every block, and
    the ``embeddings.position_ids`` buffer (int64 (1, L)) that SD 1.x checkpoints carry."""
    hf = open_clip_to_hf(text, count_blocks(text))
    length = text["positional_embedding"].shape[0]
    return {**hf, "embeddings.position_ids": torch.arange(length, dtype=torch.int64)[None]}  # (1, L)
