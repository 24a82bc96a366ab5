"""Our training checkpoints (Lightning ``.ckpt`` written by ``train.py``) as ``ModelBundle``s.

A checkpoint's ``ldm`` entry holds the typed model spec (``ModelBundle.metadata()``: constructor
arguments of our three networks, schedule, prediction type, image size) and, for each frozen part
too big to embed, a ``FrozenSource`` (the local file it came from and its fingerprint). Loading
builds our own classes from the checked spec; nothing stored in a checkpoint is instantiated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.checkpoints import (
    find_prefix,
    fingerprint_state,
    load_state_dict_file,
    load_training_checkpoint,
    resolve_path,
    submodule_state,
)
from ldm.errors import UserError
from ldm.formats.bundle import ModelBundle
from ldm.formats.lora import (
    LoRAWeights,
    apply_loras,
    checked_weights,
    export_lora,
    lora_from_checkpoint,
    lora_spec,
    run_info,
)
from ldm.formats.spec import FrozenSource, checked_schedule, stored_path
from ldm.formats.text_encoder import load_text_weights
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.conditioners import OpenCLIPTextEncoder

FROZEN = ("autoencoder", "conditioner")
BUNDLE_PART = {"unet": "unet", "autoencoder": "vae", "conditioner": "text"}
CLASS_TARGETS = {
    "unet": "ldm.models.unet.UNetModel",
    "autoencoder": "ldm.models.autoencoder.AutoencoderKL",
    "conditioner": "ldm.formats.text_encoder.open_clip_text_encoder",
}
# what runs from before the text encoder's loading moved to ldm.formats stored in their config
LEGACY_TARGETS = {"conditioner": "ldm.models.conditioners.OpenCLIPTextEncoder"}
WITH_WEIGHTS = "ldm.checkpoints.with_weights"
SPEC_TARGET = "ldm.diffusion.schedules.NoiseSchedule.from_spec"
BETA_TARGETS = {f"ldm.diffusion.schedules.{kind}_betas": kind for kind in ("scaled_linear", "linear", "cosine")}
_NOT_KWARGS = ("_target_", "_partial_", "_convert_", "_recursive_")


# ------------------------------------------------------------------ the spec, from a run's config
def _network_node(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The constructor node of ``model.<name>`` (a ``with_weights`` wrapper unwrapped), checked to
    build our own class."""
    node = config["model"][name]
    if isinstance(node, dict) and node.get("_target_") == WITH_WEIGHTS:
        node = node.get("module")
    if not isinstance(node, dict) or node.get("_target_") not in (CLASS_TARGETS[name], LEGACY_TARGETS.get(name)):
        found = node.get("_target_") if isinstance(node, dict) else type(node).__name__
        raise UserError(f"model.{name} must build {CLASS_TARGETS[name]} to be saved in a checkpoint, found {found!r}")
    return {k: v for k, v in node.items() if k not in _NOT_KWARGS}


def schedule_spec(node: dict[str, Any]) -> dict[str, Any]:
    """The ``ScheduleSpec`` dict of a run's ``schedule`` config node: ``NoiseSchedule.from_spec``'s
    fields, or (runs from before the spec) a ``from_betas`` node naming one of our beta functions."""
    if isinstance(node, dict) and node.get("_target_") == SPEC_TARGET:
        return checked_schedule({k: v for k, v in node.items() if k not in _NOT_KWARGS})
    return _legacy_schedule_spec(node)


def _legacy_schedule_spec(node: dict[str, Any]) -> dict[str, Any]:
    betas = node.get("betas") if isinstance(node, dict) else None
    if not isinstance(betas, dict) or betas.get("_target_") not in BETA_TARGETS:
        found = betas.get("_target_") if isinstance(betas, dict) else None
        raise UserError(f"schedule.betas must be one of {sorted(BETA_TARGETS)}, found {found!r}")
    return dict(
        kind=BETA_TARGETS[betas["_target_"]],
        **{k: v for k, v in betas.items() if k not in _NOT_KWARGS},
        zero_terminal_snr=bool(node.get("zero_terminal_snr", False)),
        snr_shift=float(node.get("snr_shift", 1.0)),
    )


def model_spec(config: dict[str, Any]) -> dict[str, Any]:
    """``ModelBundle.metadata()`` of the model a run's resolved config builds (checked, plain data)."""
    try:
        text_config = _network_node(config, "conditioner")
        text_config.pop("pretrained", None)  # the weights travel in the checkpoint or by FrozenSource
        bundle = ModelBundle(
            unet_config=_network_node(config, "unet"),
            vae_config=_network_node(config, "autoencoder"),
            text_config=text_config,
            unet={},
            vae={},
            text={},
            family=config["model"].get("family", "custom"),
            prediction_type=config["objective"]["prediction_type"],
            image_size=int(config["task"]["image_size"]),
            schedule=schedule_spec(config["schedule"]),
        )
    except (KeyError, TypeError, AttributeError) as error:
        raise UserError(
            f"the run's config does not describe a text-to-image model ({type(error).__name__}: {error})"
        ) from None
    return bundle.metadata()


def frozen_source_paths(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Where a run's frozen parts come from: ``{name: {kind, path, prefix}}`` (no fingerprint yet).

    ``model.pretrained`` (a model file) gives both, and the U-Net, which a LoRA run keeps frozen;
    otherwise the VAE's ``with_weights`` path and the text encoder's ``pretrained`` file. A seeded
    random text tower is ``seeded``; a VAE with random weights has no source (it is then always
    embedded in the checkpoint).
    """
    model = config["model"]
    sources: dict[str, dict[str, Any]] = {}
    if model.get("pretrained"):
        return {name: dict(kind="model", path=stored_path(model["pretrained"])) for name in ("unet", *FROZEN)}
    vae = model.get("autoencoder") or {}
    if vae.get("_target_") == WITH_WEIGHTS and vae.get("path"):
        sources["autoencoder"] = dict(kind="weights", path=stored_path(vae["path"]), prefix=vae.get("prefix"))
    text_weights = (model.get("conditioner") or {}).get("pretrained")
    if text_weights and resolve_path(text_weights).exists():
        sources["conditioner"] = dict(kind="weights", path=stored_path(text_weights))
    elif not text_weights:
        sources["conditioner"] = dict(kind="seeded")
    return sources


# ------------------------------------------------------------------ reading a checkpoint back
ModelLoader = Callable[..., ModelBundle]  # (path, use_ema=False) -> the model in that file


def bundle_from_training_checkpoint(
    path: str | Path, use_ema: bool = True, sources: dict[str, str] | None = None, load_model: ModelLoader | None = None
) -> ModelBundle:
    """The model of a training checkpoint (EMA U-Net by default), built from its stored spec.

    A LoRA run's checkpoint (``ldm.lora`` with rank > 0) gives its base model with the (EMA) adapters
    merged into the weights: the model it samples.
    ``sources`` maps a frozen part (``unet``/``autoencoder``/``conditioner``) to a new path for the file
    it was loaded from, when that file has moved; the fingerprint must still match. ``load_model``
    reads a source of kind ``model`` (any model format: ``ldm.formats.load_bundle``).
    """
    checkpoint = load_training_checkpoint(path)
    record = checkpoint["ldm"]
    state = checkpoint["state_dict"]
    spec = checkpoint_spec(record)
    lora = lora_spec(record.get("lora") if isinstance(record, dict) else None)
    parts = {}
    for name in ("unet", *FROZEN):
        if name == "unet" and not lora.enabled:
            prefix = "ema.module." if use_ema and any(k.startswith("ema.module.") for k in state) else "unet."
            parts[name] = submodule_state(state, prefix)
            continue
        embedded = submodule_state(state, f"{name}.")
        if name == "conditioner":
            embedded = submodule_state(embedded, "model.")
        parts[name] = embedded or _from_source(path, record, name, spec, (sources or {}).get(name), load_model)
    bundle = ModelBundle.from_metadata(spec, parts["unet"], parts["autoencoder"], parts["conditioner"])
    bundle = dataclasses.replace(bundle, text=_used_text_state(bundle.text, bundle.text_config))
    if lora.enabled:
        adapters = checked_weights(lora_from_checkpoint(checkpoint, use_ema, path), bundle, path)
        bundle = apply_loras(bundle, [(adapters, 1.0)])
    return bundle


def checkpoint_spec(record: Any) -> dict[str, Any] | None:
    """The typed model spec of a checkpoint's ``ldm`` record; for checkpoints written before it carried
    one, parsed from its config as plain data (nothing is instantiated)."""
    spec = record.get("spec") if isinstance(record, dict) else None
    if spec is None and isinstance(record, dict):
        spec = model_spec(record.get("config") or {})
    return spec


def _used_text_state(tower_state: dict[str, Tensor], text_config: dict[str, Any]) -> dict[str, Tensor]:
    """The text tower tensors the model runs (``text_config`` already checked by ``ModelBundle``):
    blocks it never runs (SD 2.x's last, seeded when the run loaded a 23-block diffusers encoder)
    are not part of the model it exports."""
    with torch.device("meta"):
        encoder = OpenCLIPTextEncoder(**text_config)
    return encoder.used_state(tower_state)


def _from_source(
    checkpoint_path: str | Path,
    record: dict[str, Any],
    name: str,
    spec: dict[str, Any],
    moved: str | None,
    load_model: ModelLoader | None,
) -> dict[str, Tensor]:
    """A frozen part left out of a checkpoint, read from the file it names and checked by fingerprint."""
    stored = (record.get("frozen_sources") or {}).get(name)
    if stored is None:
        raise UserError(
            f"{checkpoint_path}: its {name} is not in the file and it names no source for it "
            f"(a checkpoint from before sources were recorded): resume that run once with the "
            f"same config to save a new checkpoint"
        )
    source = FrozenSource.from_dict(stored)
    path = moved or source.path
    if source.kind != "seeded" and not (resolve_path(path).exists()):
        raise UserError(
            f"{checkpoint_path}: its {name} weights are kept in {path}, which is missing: put the "
            f"file back, or name its new place (sample.py/convert: sources.{name}=PATH)"
        )
    weights = _read_source(source, path, name, spec, load_model)
    if name == "conditioner":
        actual = fingerprint_state({f"model.{k}": v for k, v in weights.items()})
    else:
        actual = fingerprint_state(weights)
    if actual != source.fingerprint:
        raise UserError(
            f"{checkpoint_path}: the {name} weights in {path or 'its seeded init'} differ from those "
            f"the run trained with (fingerprint {actual}, expected {source.fingerprint}): "
            f"restore the original file"
        )
    return weights


def _read_source(
    source: FrozenSource, path: str | None, name: str, spec: dict[str, Any], load_model: ModelLoader | None
) -> dict[str, Tensor]:
    if source.kind == "model":
        if load_model is None:
            raise UserError(f"the {name} comes from the model file {path}, and no reader was given for it")
        if name == "unet":  # a LoRA run's base: train.py loads model.pretrained with its EMA weights
            return load_model(path, use_ema=True).unet
        if name == "conditioner":  # as train.py loads it: the seeded tower, then the file's text weights
            # (a model file may leave out what the encoder never runs, e.g. blocks past its layer)
            encoder = OpenCLIPTextEncoder(**spec["text_config"])
            load_text_weights(encoder, load_model(path).text)
            return dict(encoder.model.state_dict())
        return getattr(load_model(path), BUNDLE_PART[name])
    if name == "autoencoder":  # a weights file of the VAE alone, or of a whole model under a prefix
        with torch.device("meta"):
            first_key = next(iter(AutoencoderKL(**spec["vae_config"]).state_dict()))
        state = load_state_dict_file(path)
        prefix = source.prefix if source.prefix is not None else find_prefix(state, first_key, path)
        return submodule_state(state, prefix)
    encoder = OpenCLIPTextEncoder(**spec["text_config"])  # seeded init; a local file only, never a hub tag
    if source.kind == "weights":
        load_text_weights(encoder, load_state_dict_file(path))
    return dict(encoder.model.state_dict())


def export_checkpoint_lora(
    path: str | Path, output: str | Path, format: str = "kohya", dtype: torch.dtype | None = None, use_ema: bool = True
) -> tuple[Path, LoRAWeights]:
    """Write the (EMA) adapters of a LoRA run's training checkpoint as a LoRA file, with the run's
    base model (path and fingerprint), steps, resolution and optimiser in its metadata."""
    checkpoint = load_training_checkpoint(path)
    weights = lora_from_checkpoint(checkpoint, use_ema, path)
    record = checkpoint["ldm"]
    shapes_only = ModelBundle.from_metadata(checkpoint_spec(record), {}, {}, {})  # configs: names, family, size
    return export_lora(weights, shapes_only, output, format, dtype, run_info(checkpoint)), weights
