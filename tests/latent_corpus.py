"""Hand-written precomputed-latent shards (``ldm.data.latent_format``) for the tests: made-up frozen
parts, values a function of each sample's key."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np

LATENT_SHAPE, CONTEXT_SHAPE = (4, 2, 2), (3, 5)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def latent_meta(
    flipped: bool = True,
    fingerprint: str = "vae0",
    store: str = "distribution",
    latent_shape=LATENT_SHAPE,
    context_shape=CONTEXT_SHAPE,
    image_size: int = 16,
    scaling_factor: float = 0.5,
) -> dict:
    """A ``__meta__.json`` as the latent writer makes it, for made-up frozen parts."""
    part = {"class": "made.up", "attributes": {}, "config": None}
    return {
        "format": "ldm.latents/1",
        "store": store,
        "image_size": image_size,
        "center_crop": True,
        "flipped": flipped,
        "latent_shape": list(latent_shape),
        "context_shape": list(context_shape),
        "context_dtype": "float16",
        "scaling_factor": scaling_factor,
        "autoencoder": {**part, "fingerprint": fingerprint},
        "conditioner": {**part, "fingerprint": "text0"},
    }


def empty_context(context_shape=CONTEXT_SHAPE) -> np.ndarray:
    return np.full(tuple(context_shape), -1.0, dtype=np.float32)


def latent_header(meta: dict | None = None) -> list:
    meta = meta or latent_meta()
    return [
        ("__meta__.json", json.dumps(meta).encode()),
        ("__meta__.empty_context.npy", npy(empty_context(meta["context_shape"]))),
    ]


def latent_sample(key: str, flipped: bool = True, latent_shape=LATENT_SHAPE, context_shape=CONTEXT_SHAPE) -> list:
    """The members of one latent sample, its values a function of its key (flipped: negated means)."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    mean = rng.standard_normal(tuple(latent_shape)).astype(np.float32)
    logvar = np.full(tuple(latent_shape), -4.0, dtype=np.float32)
    members = [(f"{key}.mean.npy", npy(mean)), (f"{key}.logvar.npy", npy(logvar))]
    if flipped:
        members += [(f"{key}.mean_flipped.npy", npy(-mean)), (f"{key}.logvar_flipped.npy", npy(logvar))]
    context = rng.standard_normal(tuple(context_shape)).astype(np.float16)
    return members + [(f"{key}.context.npy", npy(context)), (f"{key}.txt", f"caption {key}".encode())]


def write_latent_shard(path: Path, keys: list[str], meta: dict | None = None) -> str:
    """A latent shard: the ``__meta__`` header, then one latent sample per key (shapes from ``meta``)."""
    meta = meta or latent_meta()
    samples = [
        m
        for key in keys
        for m in latent_sample(key, meta.get("flipped", False), meta["latent_shape"], meta["context_shape"])
    ]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in latent_header(meta) + samples:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return str(path)
