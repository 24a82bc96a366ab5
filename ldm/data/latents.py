"""The DataModule of ``data=latents``: precomputed latent shards (``data_scripts/precompute_latents.py``)
-> batches {"latent": (B,C,h,w) scaled, "context": (B,L,D) float32, "caption": [B], "key": [B], "skipped"}.

The same stream as the image shards (``ldm.data.streams.ShardStream``) with the latent decoder
(``ldm.data.latent_samples``): seeded shard draws, weighted sources, shuffle, caption dropout and
flips; bad shards and samples skipped and counted; validation split across ranks (by samples when
there are fewer shards than ranks); an exact resume from the position a checkpoint keeps. The
format: ``ldm.data.latent_format``; writing: ``ldm.data.latent_writer``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ldm.data.latent_format import LatentsMismatchError, check_latents_match, read_shard_meta, same_dataset
from ldm.data.latent_samples import ToLatentSample
from ldm.data.shard_reader import DEFAULT_MAX_MEMBER_BYTES
from ldm.data.shards import ShardSpec
from ldm.data.stream_datamodule import StreamDataModule
from ldm.errors import UserError


class LatentShardDataModule(StreamDataModule):
    """Precomputed latent shards for training and validation (every argument is a key of
    ``configs/data/latents.yaml``).

    Batches go straight through ``LatentDiffusion.encode_batch``: no VAE or text encoder runs.
    image_size: the image size the latents were made at (the task's sampling size); checked.
    check_model: at ``setup``, check the shards were made by the VAE and text encoder of the model
        being trained (``trainer.lightning_module.autoencoder`` / ``.conditioner``).
    caption_dropout: see ``ToLatentSample``; the config sets it to ``task.caption_dropout``.
    random_flip: use the flipped image's latent half the time (shards precomputed with flips=true).
    The others are ``StreamDataModule``'s, as for image shards (sources, samples_per_epoch, seed, ...).
    """

    def __init__(
        self,
        shards: ShardSpec | None = None,
        image_size: int = 256,
        val_shards: ShardSpec | None = None,
        sources: Sequence[Mapping[str, Any]] | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        caption_dropout: float = 0.0,
        random_flip: bool = False,
        check_model: bool = True,
        read_timeout: float | None = 300.0,
        max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
    ):
        super().__init__(
            shards=shards,
            val_shards=val_shards,
            sources=sources,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            samples_per_epoch=samples_per_epoch,
            seed=seed,
            read_timeout=read_timeout,
            max_member_bytes=max_member_bytes,
        )
        if not 0.0 <= caption_dropout < 1.0:
            raise UserError(f"data.caption_dropout must be in [0, 1), got {caption_dropout}")
        self.image_size = image_size
        self.caption_dropout = caption_dropout
        self.random_flip = random_flip
        self.check_model = check_model
        self.meta: dict[str, Any] = {}

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        # the first shard of each source (and of validation) is read here; every other one is
        # checked against the first as it streams by (a foreign one is skipped and counted)
        self.meta, empty_context = read_shard_meta(self.train_sources[0].urls[0], self.read_timeout)
        firsts = [source.urls[0] for source in self.train_sources[1:]] + self.val_urls[:1]
        for url in firsts:
            difference = same_dataset(read_shard_meta(url, self.read_timeout)[0], self.meta)
            if difference is not None:
                raise LatentsMismatchError(
                    f"{url} and {self.train_sources[0].urls[0]} hold different latents: {difference}"
                )
        if self.meta["image_size"] != self.image_size:
            raise LatentsMismatchError(
                f"data.image_size={self.image_size} but the latent shards were made at {self.meta['image_size']} px"
            )
        if self.random_flip and not self.meta.get("flipped"):
            raise UserError(
                "data.random_flip=true needs latent shards made with flips=true "
                "(python data_scripts/precompute_latents.py ... flips=true)"
            )
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.check_model and module is not None and hasattr(module, "autoencoder"):
            check_latents_match(self.meta, module.autoencoder, module.conditioner, empty_context)
        self.train_sample = ToLatentSample(self.meta, empty_context, True, self.caption_dropout, self.random_flip)
        self.val_sample = ToLatentSample(self.meta, empty_context, False)
