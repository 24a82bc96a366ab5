"""A raw latent-shard sample -> a training sample, or a reason to drop it: the latent decoder of
``ldm.data.streams.ShardStream`` (the image decoder is ``ldm.data.samples.ToTrainingSample``).

Every random choice comes from the generator the stream hands each sample (seeded by its place in
the stream), so a latent stream is as reproducible and resumable as an image stream.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ldm.data.latent_format import latent_members, npy_load, parse_meta, same_dataset
from ldm.data.skips import CORRUPT_LATENT, FOREIGN_LATENT_SHARD, NOT_LATENT_SHARD, SkipSample
from ldm.data.streams import SkipShard


class ToLatentSample:
    """Raw latent-shard sample -> {"latent": (C,h,w) scaled, "context": (L,D) float32, "caption": str, "key": str}.

    meta / empty_context: the first shard's ``__meta__`` and empty-prompt context (L, D): every
        shard's header must describe the same latents (``check_header``), or the shard is skipped
        and counted (``not_latent_shard``, ``foreign_latent_shard``).
    store="distribution": z = mean + exp(logvar / 2) * eps, a fresh eps each time in training (from
        the sample's generator) and one fixed by the sample key in validation; latent = scaling_factor * z.
    caption_dropout: probability of replacing the context by the empty prompt's (and the caption by
        ""), as ``LatentDiffusion.drop_captions`` does for images (its ``encode_batch`` passes
        precomputed contexts through untouched).
    random_flip: with probability 1/2, the latent of the horizontally flipped image (precomputed with
        flips=true): the flip the image pipeline would have made, through the VAE, not a flipped latent.
    A member that is missing, does not load, has the wrong shape or holds NaN/Inf drops the sample
    (``corrupt_latent``).
    """

    def __init__(
        self,
        meta: Mapping[str, Any],
        empty_context: np.ndarray,
        train: bool,
        caption_dropout: float = 0.0,
        random_flip: bool = False,
    ):
        if random_flip and not meta.get("flipped"):
            raise ValueError("random_flip needs latent shards precomputed with flips=true")
        self.meta = dict(meta)
        self.store = meta["store"]
        self.scaling_factor = float(meta["scaling_factor"])
        self.latent_shape = tuple(meta["latent_shape"])
        self.context_shape = tuple(meta["context_shape"])
        self.empty_context = torch.from_numpy(empty_context.astype(np.float32))  # (L, D)
        self.train = train
        self.caption_dropout = caption_dropout if train else 0.0
        self.random_flip = random_flip and train

    def check_header(self, url: str, raw: dict[str, Any]) -> None:
        """A shard's first sample: its ``__meta__``, which must describe the same latents as the first shard's."""
        try:
            meta = parse_meta(raw)
        except (KeyError, TypeError, ValueError) as error:
            raise SkipShard(NOT_LATENT_SHARD, str(error)[:200]) from None
        difference = same_dataset(meta, self.meta)
        if difference is not None:
            raise SkipShard(FOREIGN_LATENT_SHARD, f"made by another precompute than the first shard: {difference}")

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        drop = self.caption_dropout > 0 and rng.random() < self.caption_dropout
        flipped = self.random_flip and rng.random() < 0.5
        noise_seed = rng.getrandbits(63) if self.train else zlib.crc32(sample["__key__"].encode())
        names = latent_members(self.store, flipped)
        tensors = [self._member(sample, name, self.latent_shape) for name in names]
        if self.store == "sample":
            latent = tensors[0]
        else:
            mean, logvar = tensors  # (C, h, w) each
            eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(noise_seed))
            latent = self.scaling_factor * (mean + torch.exp(0.5 * logvar) * eps)
        context = self._member(sample, "context.npy", self.context_shape)  # (L, D)
        try:
            caption = sample.get("txt", b"").decode("utf-8")
        except UnicodeDecodeError:
            caption = sample["txt"].decode("utf-8", "replace")
        if drop:
            context, caption = self.empty_context, ""
        return {"latent": latent, "context": context, "caption": caption, "key": sample["__key__"]}

    @staticmethod
    def _member(sample: dict[str, Any], name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in sample:
            raise SkipSample(CORRUPT_LATENT, f"no {name}")
        try:
            array = npy_load(sample[name], shape).astype(np.float32)
        except Exception as error:  # noqa: BLE001 - a member is untrusted bytes
            raise SkipSample(CORRUPT_LATENT, f"{name}: {type(error).__name__}: {error}"[:200]) from None
        if not np.isfinite(array).all():
            raise SkipSample(CORRUPT_LATENT, f"{name} holds NaN or Inf")
        return torch.from_numpy(array)
