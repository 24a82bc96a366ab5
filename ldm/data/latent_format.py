"""The precomputed-latent shard format: members, the ``__meta__`` header, and the model identity check.

Output shard ``{split}-NNNNNN.tar`` is made from input shard NNNNNN of that split (written by
``ldm.data.latent_writer``). Per sample:

    mean.npy, logvar.npy  (C, h, w) float32   store="distribution": the posterior q(z|x) of the VAE
    latent.npy            (C, h, w) float32   store="sample": scaling_factor * z, one z ~ q(z|x)
    mean_flipped.npy, logvar_flipped.npy / latent_flipped.npy
                                              flips=true: the same of the horizontally flipped image
    context.npy           (L, D) float16|32   the text encoder's hidden states of the caption
    txt                                       the caption (as picked and cleaned by the image pipeline)
    json                                      the input's .json, unchanged

Every shard opens with a ``__meta__`` sample: ``__meta__.json`` (the identity of the VAE and text
encoder: fingerprints, attributes and configs; scaling factor, image size, store mode, flips; the
source shard) and ``__meta__.empty_context.npy`` (the float32 context of "", for caption dropout and
the model check). Readers check it against the model they train (``check_latents_match``) and
against the first shard (``same_dataset``).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.checkpoints import fingerprint
from ldm.data.shard_reader import read_shard
from ldm.data.skips import DataCounts
from ldm.errors import UserError

FORMAT = "ldm.latents/1"
STORE_MODES = ("distribution", "sample")
CONTEXT_DTYPES = {"float16": np.float16, "float32": np.float32}
META_KEY = "__meta__"
FLIPPED = "_flipped"  # suffix of the flipped image's members: mean_flipped.npy, latent_flipped.npy
# Plain attributes that change what a frozen part computes without changing its weights.
IDENTITY_ATTRIBUTES = (
    "downsampling_factor",
    "latent_channels",  # VAE (scaling_factor is checked on its own)
    "num_blocks",
    "pad_token_id",
    "max_length",
    "context_dim",  # text encoder: layer, padding, shape
)
# The empty prompt's context is stored in float32 from a float32 run of the text encoder, so a
# float32 rerun on any device agrees to ~1e-6; a different layer, padding or activation does not
# (QuickGELU instead of GELU moves even a random 1-layer tower by ~7e-3).
EMPTY_CONTEXT_RTOL = 1e-3


class LatentsMismatchError(UserError, ValueError):
    """Latent shards made with a different VAE or text encoder than the configured model's."""


def latent_members(store: str, flipped: bool = False) -> tuple[str, ...]:
    """The member names holding a sample's latent in ``store`` mode (of the flipped image: ``flipped``)."""
    names = ("latent",) if store == "sample" else ("mean", "logvar")
    return tuple(f"{name}{FLIPPED if flipped else ''}.npy" for name in names)


# --------------------------------------------------------------------------------------- identity
def module_identity(module: nn.Module, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a frozen part: class, weight fingerprint, behaviour-changing attributes, config.

    The config is recorded for people; only class, fingerprint and attributes are compared.
    """
    attributes = {name: getattr(module, name) for name in IDENTITY_ATTRIBUTES if hasattr(module, name)}
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "fingerprint": fingerprint(module),
        "attributes": attributes,
        "config": dict(config) if config is not None else None,
    }


def latents_metadata(
    autoencoder: nn.Module,
    conditioner: nn.Module,
    store: str,
    image_size: int,
    context_dtype: str,
    configs: Mapping[str, Any] | None = None,
    flips: bool = False,
) -> dict[str, Any]:
    """The ``__meta__.json`` shared by every shard of one precompute run (``source`` added per shard)."""
    configs = configs or {}
    latent_side = image_size // autoencoder.downsampling_factor
    return {
        "format": FORMAT,
        "store": store,
        "image_size": image_size,
        "center_crop": True,
        "flipped": flips,
        "latent_shape": [autoencoder.latent_channels, latent_side, latent_side],
        "context_shape": [conditioner.max_length, conditioner.context_dim],
        "context_dtype": context_dtype,
        "scaling_factor": autoencoder.scaling_factor,
        "autoencoder": module_identity(autoencoder, configs.get("autoencoder")),
        "conditioner": module_identity(conditioner, configs.get("conditioner")),
    }


def _compared(identity: Mapping[str, Any]) -> dict[str, Any]:
    return {key: identity.get(key) for key in ("class", "fingerprint", "attributes")}


def same_dataset(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """None if two shard metas describe the same latents (source aside), else the first difference."""
    for key in ("format", "store", "image_size", "latent_shape", "context_shape", "scaling_factor"):
        if a.get(key) != b.get(key):
            return f"{key} {a.get(key)} vs {b.get(key)}"
    if bool(a.get("flipped")) != bool(b.get("flipped")):  # (shards written before flips have no key)
        return f"flipped {bool(a.get('flipped'))} vs {bool(b.get('flipped'))}"
    for part in ("autoencoder", "conditioner"):
        if not isinstance(a.get(part), Mapping) or not isinstance(b.get(part), Mapping):
            return f"{part}: not recorded"
        if _compared(a[part]) != _compared(b[part]):
            return f"{part} {a[part].get('fingerprint')} vs {b[part].get('fingerprint')}"
    return None


def check_latents_match(
    meta: Mapping[str, Any],
    autoencoder: nn.Module,
    conditioner: nn.Module,
    empty_context: np.ndarray | None = None,
) -> None:
    """Raise ``LatentsMismatchError`` (one line) unless the shards' ``meta`` was made by these frozen parts.

    Compares weight fingerprints, behaviour-changing attributes and the scaling factor; with
    ``empty_context`` (the stored float32 context of "", (L, D)) also recomputes it in float32,
    which catches text encoder options the weights do not show (layer, padding, activation).
    """
    for name, module in (("autoencoder", autoencoder), ("conditioner", conditioner)):
        recorded, actual = meta[name], module_identity(module)
        if recorded["fingerprint"] != actual["fingerprint"]:
            raise LatentsMismatchError(
                f"latent shards were made with a different {name} (fingerprint {recorded['fingerprint']}, "
                f"model.{name} is {actual['fingerprint']}): precompute them again with this model"
            )
        for key, value in actual["attributes"].items():
            if recorded["attributes"].get(key) != value:
                raise LatentsMismatchError(
                    f"latent shards were made with {name}.{key}={recorded['attributes'].get(key)}, "
                    f"model.{name} has {value}: precompute them again with this model"
                )
    if not math.isclose(meta["scaling_factor"], autoencoder.scaling_factor, rel_tol=1e-6):
        raise LatentsMismatchError(
            f"latent shards were scaled by {meta['scaling_factor']}, model.autoencoder.scaling_factor "
            f"is {autoencoder.scaling_factor}: set it to match or precompute again"
        )
    if empty_context is not None:
        device = next(conditioner.parameters()).device
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            actual = conditioner([""])[0].float().cpu()  # (L, D)
        stored = torch.from_numpy(empty_context.astype(np.float32))
        error = ((actual - stored).norm() / stored.norm().clamp_min(1e-12)).item()
        if actual.shape != stored.shape or error > EMPTY_CONTEXT_RTOL:
            raise LatentsMismatchError(
                f"model.conditioner encodes the empty prompt differently from the one that made the latent "
                f"shards (relative error {error:.3g}; layer, padding or activation differ): precompute again"
            )


# ----------------------------------------------------------------------------------- shard members
def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` to bytes (a ``.npy`` member)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_load(data: bytes, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A ``.npy`` member (never unpickled). With ``shape``, the header is checked before anything is
    allocated: a member is untrusted, and its header may declare any size. Raises ``ValueError``."""
    buffer = io.BytesIO(data)
    if shape is not None:
        version = np.lib.format.read_magic(buffer)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"npy format version {version}")
        header_shape, _, dtype = read_header[version](buffer)
        if tuple(header_shape) != tuple(shape) or dtype.kind != "f":
            raise ValueError(f"holds {dtype} {tuple(header_shape)}, not float {tuple(shape)}")
        buffer.seek(0)
    return np.load(buffer, allow_pickle=False)


def parse_meta(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A ``__meta__`` sample's JSON; raises ``ValueError`` for one that is not ours."""
    if raw.get("__key__") != META_KEY:
        raise ValueError(f"its first sample is {raw.get('__key__')!r}, not {META_KEY!r}")
    meta = json.loads(raw["json"])
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else meta!r}, not {FORMAT}")
    return meta


def read_shard_meta(url: str, read_timeout: float | None = 300.0) -> tuple[dict[str, Any], np.ndarray]:
    """(``__meta__.json`` as a dict, empty-prompt context (L, D)) of a latent shard: its first sample."""
    counts = DataCounts()
    samples = read_shard(url, counts, read_timeout)
    try:
        first = next(samples, None)
    finally:
        samples.close()
    if first is None:
        reason, _, detail = counts.last_skip
        raise LatentsMismatchError(f"cannot read the latent shard {url}: {reason or 'no sample'} {detail}".strip())
    try:
        meta = parse_meta(first)
        return meta, npy_load(first["empty_context.npy"], tuple(meta["context_shape"]))
    except (KeyError, TypeError, ValueError) as error:
        raise LatentsMismatchError(
            f"{url} is not a latent shard ({error}): make latent shards with data_scripts/precompute_latents.py"
        ) from None
