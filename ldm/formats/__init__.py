"""Model formats: SD single files, diffusers folders and our training checkpoints, via ``ModelBundle``."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ldm.errors import UserError
from ldm.formats.bundle import ModelBundle
from ldm.formats.diffusers_folder import export_diffusers, import_diffusers, is_diffusers_folder
from ldm.formats.single_file import export_single_file, import_single_file
from ldm.formats.text_encoder import load_text_weights
from ldm.formats.training import bundle_from_training_checkpoint

MAX_SOURCE_DEPTH = 3  # a run fine-tuned from a run fine-tuned from ...: bounded, so no reference loops

__all__ = ["ModelBundle", "detect_format", "load_bundle", "export_diffusers", "export_single_file"]


def detect_format(path: str | Path) -> str:
    """``diffusers`` (a folder), ``training`` (our Lightning checkpoint) or ``sd`` (a single file)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if is_diffusers_folder(path):
            return "diffusers"
        raise UserError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
    if not path.is_file():
        raise UserError(f"model not found: {path}")
    if path.suffix == ".safetensors":
        return "sd"
    try:
        checkpoint = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except Exception as error:  # corrupt, or pickles code: refuse either way
        raise UserError(f"{path} is not a readable checkpoint ({type(error).__name__})") from error
    return "training" if isinstance(checkpoint, dict) and "ldm" in checkpoint else "sd"


def load_bundle(
    path: str | Path,
    use_ema: bool = True,
    prediction_type: str | None = None,
    image_size: int | None = None,
    sources: dict[str, str] | None = None,
    _depth: int = 0,
) -> ModelBundle:
    """Read any supported model format; ``prediction_type``/``image_size`` override what it says.

    ``sources``: for a training checkpoint whose frozen parts are kept by reference, new paths of
    those files (``{"autoencoder": PATH, "conditioner": PATH}``) when they have moved.
    """
    kind = detect_format(path)
    if kind == "training":
        if _depth >= MAX_SOURCE_DEPTH:
            raise UserError(
                f"{path}: a chain of checkpoints naming each other's frozen parts, deeper than {MAX_SOURCE_DEPTH}"
            )
        load_source = functools.partial(load_bundle, use_ema=False, _depth=_depth + 1)
        bundle = bundle_from_training_checkpoint(path, use_ema, sources, load_source)
    elif kind == "diffusers":
        bundle = import_diffusers(path)
    else:
        return import_single_file(path, prediction_type, image_size)
    if prediction_type is not None or image_size is not None:
        metadata = bundle.metadata()
        metadata.update(
            {k: v for k, v in (("prediction_type", prediction_type), ("image_size", image_size)) if v is not None}
        )
        bundle = ModelBundle.from_metadata(metadata, bundle.unet, bundle.vae, bundle.text)
    return bundle


def load_weights_into(unet, autoencoder, conditioner, path: str | Path, use_ema: bool = True) -> ModelBundle:
    """Load a model file (any supported format) into already-built networks, checking they fit.

    Used to fine-tune: ``python train.py experiment=sd15_finetune model.pretrained=v1-5.safetensors``.
    """
    bundle = load_bundle(path, use_ema)
    for name, module, state in (("unet", unet, bundle.unet), ("autoencoder", autoencoder, bundle.vae)):
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[1:2] or [""]
            raise UserError(f"{path}: its {name} does not fit model.{name} ({first[0].strip()})") from error
    try:
        load_text_weights(conditioner, bundle.text)
    except (KeyError, RuntimeError) as error:
        raise UserError(f"{path}: its text encoder does not fit model.conditioner ({error})") from error
    return bundle
