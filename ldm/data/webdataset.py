"""The image-caption DataModule: webdataset shards -> batches for training and validation.

The pipeline (see docs/data.md): shard specs (``ldm.data.shards``) -> per rank and worker streams
(``ldm.data.streams``) -> tar reading with failure counts (``ldm.data.shard_reader``) -> metadata
filters, caption choice, image decoding and transforms (``ldm.data.samples``; with aspect-ratio
buckets ``ldm.data.buckets``) -> batches of one image shape
{"image": (B, 3, H, W) uint8, "caption": [B] str, "key": [B] str, "skipped": {key: count}}, whose
images become float32 in [-1, 1] once on the device (``on_after_batch_transfer``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ldm.data.buckets import Bucket, BucketedSample, resolve_buckets
from ldm.data.captions import DEFAULT_MAX_CAPTION_CHARS, CaptionPicker
from ldm.data.decode import SMALL_IMAGES
from ldm.data.metadata import MetadataFilter
from ldm.data.quarantine import Quarantine
from ldm.data.samples import ToTrainingSample
from ldm.data.shard_reader import DEFAULT_MAX_MEMBER_BYTES
from ldm.data.shards import ShardSpec, Source
from ldm.data.stream_datamodule import StreamDataModule
from ldm.data.streams import ShardStream
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
) -> ShardStream:
    """Shards -> batches with default decoding (no filters, no pixel limit): a shortcut for scripts
    and benchmarks; ``stream_options`` go to ``ShardStream`` (seed, samples_per_epoch, ...)."""
    to_sample = ToTrainingSample(transform, CaptionPicker(caption_keys))
    return ShardStream(
        [Source(list(urls))], to_sample, batch_size, train=train, shuffle_buffer=shuffle_buffer, **stream_options
    )


class ShardDataModule(StreamDataModule):
    """Image-caption webdataset shards for training and validation (every argument is a config key
    of ``configs/data/webdataset.yaml``, documented there and in docs/data.md).

    shards / sources / val_shards: shard specs (see ``expand_shards``, ``resolve_sources``); a local
        spec naming no shard fails in ``setup``, before training starts.
    prepare: an optional callable run once (rank 0) before reading, e.g. to generate the toy shards.
    Sources, loaders and the data position a checkpoint keeps: ``ldm.data.stream_datamodule``.
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
            prepare=prepare,
        )
        if small_images not in SMALL_IMAGES:
            raise UserError(f"data.small_images must be one of {list(SMALL_IMAGES)}, not {small_images!r}")
        try:
            captions = CaptionPicker(caption_keys, empty_captions, max_caption_chars)
            metadata_filter = MetadataFilter(**(filters or {}))
        except (ValueError, TypeError) as error:
            raise UserError(f"data: {error}") from None
        self.quarantine = quarantine
        self.image_size = image_size
        self.buckets: list[Bucket] | None = resolve_buckets(buckets, image_size, bucket_step, bucket_max_ratio)
        # with buckets, an image that does not cover its bucket is never enlarged when either says so
        self.no_upscale = bucket_no_upscale or small_images == "skip"
        self.train_sample = self._to_sample(
            captions, metadata_filter, max_pixels, small_images, center_crop, random_flip
        )
        self.val_sample = self._to_sample(captions, metadata_filter, max_pixels, small_images, True, False)

    def _to_sample(
        self,
        captions: CaptionPicker,
        metadata_filter: MetadataFilter,
        max_pixels: int | None,
        small_images: str,
        center_crop: bool,
        random_flip: bool,
    ) -> ToTrainingSample | BucketedSample:
        """Raw sample -> training sample: square crops of image_size, or crops to each image's bucket.
        Workers ship uint8 pixels (4x less to move between processes than float32); they become
        [-1, 1] floats after the transfer to the device (on_after_batch_transfer)."""
        # each converter its own quarantine: one holds one in-flight record, of one split
        quarantine = Quarantine(self.quarantine) if self.quarantine else None
        if self.buckets:
            return BucketedSample(
                self.buckets,
                captions,
                metadata_filter or None,
                max_pixels,
                self.no_upscale,
                center_crop,
                random_flip,
                uint8=True,
                quarantine=quarantine,
            )
        transform = ImageTransform(self.image_size, center_crop=center_crop, random_flip=random_flip, uint8=True)
        return ToTrainingSample(transform, captions, metadata_filter or None, max_pixels, small_images, quarantine)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """uint8 pixels -> [-1, 1] float32, on the device the batch was moved to."""
        return {**batch, "image": to_model_range(batch["image"])}
