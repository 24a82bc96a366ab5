"""The image-caption DataModule: webdataset shards -> batches for training and validation.

The pipeline (see docs/data.md): shard specs (``ldm.data.shards``) -> per rank and worker streams
(``ldm.data.streams``) -> tar reading with failure counts (``ldm.data.shard_reader``) -> metadata
filters, caption choice, image decoding and transforms (``ldm.data.samples``; with aspect-ratio
buckets ``ldm.data.buckets``) -> batches of one image shape
{"image": (B, 3, H, W) uint8, "caption": [B] str, "key": [B] str, "skipped": {key: count}}, whose
images become float32 in [-1, 1] once on the device (``on_after_batch_transfer``).
"""

from __future__ import annotations

import math
from functools import partial

from typing import Any, Callable, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.data.buckets import Bucket, BucketedSample, resolve_buckets
from ldm.data.captions import DEFAULT_MAX_CAPTION_CHARS, CaptionPicker
from ldm.data.decode import SMALL_IMAGES
from ldm.data.metadata import MetadataFilter
from ldm.data.quarantine import Quarantine
from ldm.data.samples import ToTrainingSample
from ldm.data.shard_reader import DEFAULT_MAX_MEMBER_BYTES
from ldm.data.shards import ShardSpec, ShardSpecError, Source, expand_shards, resolve_sources
from ldm.data.streams import TrainingLoader, ImageCaptionStream
from ldm.data.transforms import ImageTransform, to_model_range
from ldm.errors import UserError


def image_caption_pipeline(
    urls: Sequence[str],
    transform: ImageTransform,
    batch_size: int,
    train: bool,
    shuffle_buffer: int = 1000,
    caption_keys: Sequence[str] | str = ("txt",),
    **stream_options: Any,
) -> ImageCaptionStream:
    """Shards -> batches with default decoding (no filters, no pixel limit): a shortcut for scripts
    and benchmarks; ``stream_options`` go to ``ImageCaptionStream`` (seed, samples_per_epoch, ...)."""
    to_sample = ToTrainingSample(transform, CaptionPicker(caption_keys))
    return ImageCaptionStream(
        [Source(list(urls))], to_sample, batch_size, train=train, shuffle_buffer=shuffle_buffer, **stream_options
    )


class ShardDataModule(pl.LightningDataModule):
    """Image-caption webdataset shards for training and validation (every argument is a config key
    of ``configs/data/webdataset.yaml``, documented there and in docs/data.md).

    shards / sources / val_shards: shard specs (see ``expand_shards``, ``resolve_sources``); a local
        spec naming no shard fails in ``setup``, before training starts.
    prepare: an optional callable run once (rank 0) before reading, e.g. to generate the toy shards.
    """

    def __init__(
        self,
        shards: ShardSpec | None = None,
        val_shards: ShardSpec | None = None,
        image_size: int = 256,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        center_crop: bool = True,
        random_flip: bool = False,
        small_images: str = "upscale",
        max_pixels: int | None = 50_000_000,
        caption_keys: Sequence[str] = ("txt",),
        empty_captions: str = "drop",
        filters: Mapping[str, float | None] | None = None,
        sources: Sequence[Mapping[str, Any]] | None = None,
        read_timeout: float | None = 300.0,
        prepare: Callable[[], Any] | None = None,
        buckets: str | Sequence[Sequence[int]] | None = None,
        bucket_step: int = 64,
        bucket_max_ratio: float = 2.0,
        bucket_no_upscale: bool = False,
        max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
        max_caption_chars: int | None = DEFAULT_MAX_CAPTION_CHARS,
        quarantine: str | None = None,
    ):
        super().__init__()
        if small_images not in SMALL_IMAGES:
            raise UserError(f"data.small_images must be one of {list(SMALL_IMAGES)}, not {small_images!r}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise UserError(f"data.samples_per_epoch must be positive or null, not {samples_per_epoch}")
        try:
            captions = CaptionPicker(caption_keys, empty_captions, max_caption_chars)
            metadata_filter = MetadataFilter(**(filters or {}))
        except (ValueError, TypeError) as error:
            raise UserError(f"data: {error}") from None
        self.shards = shards
        self.sources = sources
        self.val_shards = val_shards
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.read_timeout = read_timeout
        self.max_member_bytes = max_member_bytes
        self.quarantine = quarantine
        self.prepare = prepare
        self.image_size = image_size
        self.buckets: list[Bucket] | None = resolve_buckets(buckets, image_size, bucket_step, bucket_max_ratio)
        # with buckets, an image that does not cover its bucket is never enlarged when either says so
        self.no_upscale = bucket_no_upscale or small_images == "skip"
        self.train_sample = self._to_sample(captions, metadata_filter, max_pixels, small_images, center_crop, random_flip)
        self.val_sample = self._to_sample(captions, metadata_filter, max_pixels, small_images, True, False)
        self.train_sources: list[Source] = []
        self.val_urls: list[str] = []

    def _to_sample(
        self, captions: CaptionPicker, metadata_filter: MetadataFilter, max_pixels: int | None, small_images: str,
        center_crop: bool, random_flip: bool,
    ) -> ToTrainingSample | BucketedSample:  # fmt: skip
        """Raw sample -> training sample: square crops of image_size, or crops to each image's bucket.
        Workers ship uint8 pixels (4x less to move between processes than float32); they become
        [-1, 1] floats after the transfer to the device (on_after_batch_transfer)."""
        # each converter its own quarantine: one holds one in-flight record, of one split
        quarantine = Quarantine(self.quarantine) if self.quarantine else None
        if self.buckets:
            return BucketedSample(self.buckets, captions, metadata_filter or None, max_pixels, self.no_upscale,
                                  center_crop, random_flip, uint8=True, quarantine=quarantine)  # fmt: skip
        transform = ImageTransform(self.image_size, center_crop=center_crop, random_flip=random_flip, uint8=True)
        return ToTrainingSample(transform, captions, metadata_filter or None, max_pixels, small_images, quarantine)

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """uint8 pixels -> [-1, 1] float32, on the device the batch was moved to."""
        return {**batch, "image": to_model_range(batch["image"])}

    def setup(self, stage: str | None = None) -> None:
        self.train_sources = resolve_sources(self.shards, self.sources)
        self.val_urls = expand_shards(self.val_shards) if self.val_shards else []

    def _place(self) -> tuple[int | None, int | None]:
        """(rank, world size) from the trainer; (None, None) without one."""
        trainer = self.trainer
        if trainer is None:
            return None, None
        return trainer.global_rank, trainer.world_size

    def _position(self) -> tuple[int, int]:
        """(epoch, batches of it this rank already trained on): (0, 0) for a new run.

        Counted from the optimiser steps, which checkpoints are written between; an epoch holds
        ``batches_per_epoch`` batches per rank, or never ends when samples_per_epoch is None."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        trained = trainer.global_step * trainer.accumulate_grad_batches
        per_epoch = self.batches_per_epoch(trainer.world_size)
        return (trained // per_epoch, trained % per_epoch) if per_epoch else (0, trained)

    def batches_per_epoch(self, world_size: int) -> int | None:
        """Training batches per rank and epoch (every worker yields the same number), or None."""
        if not self.samples_per_epoch:
            return None
        workers = max(self.num_workers, 1)
        return math.ceil(self.samples_per_epoch / (world_size * workers * self.batch_size)) * workers

    def _loader(self, stream: ImageCaptionStream, num_workers: int, persistent: bool = True) -> DataLoader:
        return DataLoader(
            stream,
            batch_size=None,  # the stream batches (and attaches the skip counts) itself
            num_workers=num_workers,
            # training restarts its workers at each epoch so that they start at the new position
            persistent_workers=persistent and num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # its own generator: creating a loader iterator draws a worker seed, and drawing it
            # from torch's global generator would shift the model's random numbers on resume
            generator=torch.Generator().manual_seed(self.seed or 0),
        )

    def train_dataloader(self) -> TrainingLoader:
        if not self.train_sources:
            raise ShardSpecError("train_dataloader() before setup(): no shards resolved")
        rank, world_size = self._place()
        stream = ImageCaptionStream(
            self.train_sources, self.train_sample, self.batch_size, train=True, seed=self.seed,
            shuffle_buffer=self.shuffle_buffer, samples_per_epoch=self.samples_per_epoch,
            rank=rank, world_size=world_size, read_timeout=self.read_timeout, max_member_bytes=self.max_member_bytes,
        )  # fmt: skip
        make_loader = partial(self._loader, num_workers=self.num_workers, persistent=False)
        return TrainingLoader(stream, make_loader, self.num_workers, self._position)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        rank, world_size = self._place()
        stream = ImageCaptionStream(
            [Source(self.val_urls)], self.val_sample, self.val_batch_size, train=False, seed=self.seed,
            rank=rank, world_size=world_size, read_timeout=self.read_timeout, max_member_bytes=self.max_member_bytes,
        )
        # no more workers than this rank has shards: the extra ones would only start and stop
        world_size, rank = world_size or 1, rank or 0
        split_samples = len(self.val_urls) < world_size  # (then every rank reads every shard)
        rank_shards = len(self.val_urls) if split_samples else len(self.val_urls[rank::world_size])
        return self._loader(stream, min(self.num_workers, rank_shards))
